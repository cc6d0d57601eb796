"""Orbax checkpoints of a whole run: train state (teacher, optimiser, step, PRNG) and the
input iterator's position, saved together so a resumed run replays exactly.

Orbax writes each step into a temporary folder and renames it when complete, so a run
killed at any moment leaves only complete checkpoints; ``latest_step`` ignores the
rest. Saves are asynchronous; ``close`` (the loop calls it at exit, however the run
ends) waits for them and surfaces a failed save.

Exports (``export``) and every checkpoint restore onto any mesh or device count: a
restore is placed by its target (``restore_target``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from asda_jax import sharding, storage

ITEMS = ("state", "data")


def restore_target(tree, shardings=None):
    """A restore target: ShapeDtypeStructs of ``tree``'s leaves (arrays, ShapeDtypeStructs
    or Orbax metadata) placed by ``shardings`` (a matching tree, one Sharding for every
    leaf, or None for each leaf's own). What is restored onto it lands there, whatever
    mesh it was saved from."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: x.sharding, tree)
    elif isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class Checkpoints:
    """``<workdir>/checkpoints/<step>/{state,data}``, keeping the newest ``max_to_keep``."""

    def __init__(
        self, workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True
    ):
        self.directory = storage.path(workdir) / "checkpoints"
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

    def close(self) -> None:
        """Waits for pending saves (raising if one failed), then releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


# ---------------------------------------------------------------------------- encoders

EXPORT_CONFIG = "model.json"  # an export: <dir>/model.json + <dir>/params/


class CheckpointMismatch(ValueError):
    """A checkpoint that is not where it is expected, or does not fit the model."""


def export(
    directory: str | os.PathLike,
    params: dict,
    model_cfg,
    *,
    kind: str,
    target_frames: int,
    norm: tuple[float, float],
    **description,
) -> epath.Path:
    """Writes ``params`` ({"encoder": ..., and optionally "fc_norm"/"head", "decoder",
    "teacher"}) and a JSON of the ModelConfig, the run's ``kind`` (its task), the input
    it was trained on (``target_frames``, fbank ``norm``) and ``description`` (a
    classifier's ``pooling`` and ``scores``); refuses to write into a non-empty
    directory."""
    directory = storage.path(directory)
    if "encoder" not in params:
        raise ValueError(f"an export needs an 'encoder' entry, got {sorted(params)}")
    make_export_folder(directory)
    with ocp.StandardCheckpointer() as saver:
        saver.save(directory / "params", params)
    if jax.process_index() == 0:
        config = {"model": dataclasses.asdict(model_cfg), "kind": kind}
        config |= {"target_frames": int(target_frames), "norm": [float(x) for x in norm]}
        (directory / EXPORT_CONFIG).write_text(json.dumps(config | description, indent=2))
    return directory


def make_export_folder(directory: epath.Path) -> None:
    """Process 0 makes the export's folder, refusing one that holds files; the others
    wait for its answer before anything is written (each checking for itself would
    find the files another had begun to write, and refuse)."""
    refusal = None
    if jax.process_index() == 0:
        try:
            storage.make_new_folder(directory)
        except FileExistsError as e:
            refusal = e
    if jax.process_count() > 1:
        made = bool(multihost_utils.broadcast_one_to_all(np.bool_(refusal is None)))
        if not made and refusal is None:
            refusal = FileExistsError(f"{directory} is not empty (process 0 refused it)")
    if refusal is not None:
        raise refusal


def export_description(path: str | os.PathLike) -> dict | None:
    """The JSON of an export, or None if ``path`` is not one."""
    config = storage.path(path) / EXPORT_CONFIG
    return json.loads(config.read_text()) if config.is_file() else None


def locate_params(
    path: str | os.PathLike, step: int | None = None
) -> tuple[epath.Path, tuple[str, ...]]:
    """(Orbax item folder, key path of the parameter tree inside it) of any of: an
    export, a training workdir (its latest or ``step``'s checkpoint), or one of its steps.
    Both parameter trees hold "encoder" (and "fc_norm"/"head" for classifiers)."""
    path = storage.path(path)
    if (path / EXPORT_CONFIG).is_file():
        return path / "params", ()
    if (path / "checkpoints").is_dir():
        steps = Checkpoints(path, async_save=False)
        chosen = steps.latest_step() if step is None else step
        if chosen is None or chosen not in steps.all_steps():
            raise CheckpointMismatch(
                f"{path}/checkpoints has no step {step if step is not None else '(none saved)'}; "
                f"saved: {steps.all_steps()}"
            )
        steps.close()
        path = path / "checkpoints" / str(chosen)
    if (path / "state").is_dir():
        return path / "state", ("params",)
    raise CheckpointMismatch(
        f"{path} is neither an export (<dir>/{EXPORT_CONFIG} + <dir>/params/) nor a "
        "training workdir (<workdir>/checkpoints/<step>/state/) nor one of its steps"
    )


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in leaves}


def check_fits(saved, target, where: str) -> None:
    """Raises CheckpointMismatch listing missing and unexpected keys and shape mismatches."""
    have, want = _flat_shapes(saved), _flat_shapes(target)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    differ = [k for k in want if k in have and have[k] != want[k]]
    shapes = [f"{k}: saved {have[k]}, model {want[k]}" for k in differ]
    if missing or shapes:
        raise CheckpointMismatch(
            f"{where} does not fit the model: missing {missing or 'none'}; "
            f"shape mismatches {shapes or 'none'}; unexpected {unexpected or 'none'}"
        )


def saved_tree(item: epath.Path, keys: tuple[str, ...] = ()):
    """The metadata (shapes, dtypes) of the subtree at ``keys`` of an Orbax item."""
    tree = ocp.PyTreeCheckpointer().metadata(item).item_metadata.tree
    for depth, key in enumerate(keys):
        if not isinstance(tree, dict) or key not in tree:
            found = list(tree) if isinstance(tree, dict) else type(tree).__name__
            raise CheckpointMismatch(f"{item} has no {'/'.join(keys[: depth + 1])} (found {found})")
        tree = tree[key]
    return tree


def restore_item(item: epath.Path, keys: tuple[str, ...] = (), target=None):
    """The subtree at ``keys`` of an Orbax item, placed as ``target`` says (any mesh), or
    as it was saved onto this process's first device when ``target`` is None."""
    saved = saved_tree(item, keys)
    if target is None:
        target = restore_target(saved, sharding.first_local_device())
    check_fits(saved, target, f"{item}:{'/'.join(keys)}")
    wrapped = target
    for key in reversed(keys):
        wrapped = {key: wrapped}
    restored = ocp.PyTreeCheckpointer().restore(
        item,
        args=ocp.args.PyTreeRestore(
            item=wrapped,
            restore_args=ocp.checkpoint_utils.construct_restore_args(wrapped),
            partial_restore=True,
        ),
    )
    for key in keys:
        restored = restored[key]
    return restored


def restore_params(path: str | os.PathLike, target, subtree: tuple[str, ...] = (), step=None):
    """Restores the parameters ``target`` describes (ShapeDtypeStructs with shardings,
    any mesh) from ``path`` (see ``locate_params``), reading only that subtree.
    ``("teacher",)`` is a pretraining run's EMA teacher: beside the encoder in an
    export, beside the parameters in a workdir's train state."""
    item, prefix = locate_params(path, step)
    keys = ("teacher",) if subtree == ("teacher",) else (*prefix, *subtree)
    return restore_item(item, keys, target)
