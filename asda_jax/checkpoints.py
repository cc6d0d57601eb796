"""Orbax checkpoints of a whole run: train state (teacher, optimiser, step, PRNG) and the
input iterator's position, saved together so a resumed run replays exactly.

Orbax writes each step into a temporary folder and renames it when complete, so a run
killed at any moment leaves only complete checkpoints; ``latest_step`` ignores the
rest. Saves are asynchronous; ``wait`` (called at exit) surfaces a failed save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ("state", "data")


def abstract_state(shapes, shardings):
    """ShapeDtypeStructs with shardings: the restore target (restores onto any mesh)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


class Checkpoints:
    """``<workdir>/checkpoints/<step>/{state,data}``, keeping the newest ``max_to_keep``."""

    def __init__(self, workdir: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: Any) -> None:
        if step in self._manager.all_steps():
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        self._manager.save(step, args=args, force=True)
        logging.info("checkpoint of step %d started in %s", step, self.directory)

    def restore(self, step: int, target) -> tuple[Any, Any]:
        """(state, data iterator state) of ``step``, placed as ``target`` says."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored.state, restored.data

    def wait(self) -> None:
        """Blocks until pending saves are on disk; raises if one failed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
