"""What every task trains: the train state, created already sharded, and its jitted step.

A *task* (``pretraining.PretrainTask``, ``finetuning.FinetuneTask``) says what is
trained: ``init_params`` (logically named parameters), ``optimizer``, ``init_teacher``,
``load_initial``, ``step`` and ``check``. This module turns a task into a state on a
mesh and a step compiled for it, the one way the loop, the tests and the benchmarks use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from asda_jax import checkpoints, sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates done
    params: Any
    opt_state: Any
    teacher: Any  # the EMA encoder (pretraining) or None
    rng: jax.Array  # raw uint32 key; each step folds in its number


class TrainingStopped(RuntimeError):
    """The run stopped itself (NaN loss, collapse); the last checkpoint is intact."""


def check_finite(step: int, metrics: dict) -> None:
    """Stops on a non-finite loss, gradient or updated parameter (``all_finite``)."""
    if not np.isfinite(metrics["loss"]):
        reason = f"the loss is {metrics['loss']}"
    elif not metrics["finite"]:
        reason = (
            "a gradient or an updated parameter is not finite "
            f"(gradient norm {metrics['grad_norm']})"
        )
    else:
        return
    raise TrainingStopped(f"step {step}: {reason}; stopping without saving this state")


def all_finite(*trees) -> jax.Array:  # bool scalar
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(trees)]))


@dataclasses.dataclass(frozen=True)
class StatePlan:
    """A task's train state before it exists: shapes, shardings, optimiser, initialiser."""

    abstract: TrainState  # of ShapeDtypeStructs
    shardings: TrainState  # of NamedShardings
    tx: optax.GradientTransformation
    init: Callable[[jax.Array], TrainState]  # rng -> a new state

    def restore_target(self) -> TrainState:
        """ShapeDtypeStructs placed on the plan's mesh: restores any checkpoint onto it."""
        return checkpoints.restore_target(self.abstract, self.shardings)


def plan_state(task, mesh, rng: jax.Array) -> StatePlan:
    """The plan of ``task``'s state on ``mesh``, without allocating anything."""
    boxed = jax.eval_shape(task.init_params, rng)
    param_shardings = sharding.logical_shardings(boxed, mesh)
    tx = task.optimizer(nn.meta.unbox(boxed))

    def init(rng):
        params = nn.meta.unbox(task.init_params(rng))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            teacher=task.init_teacher(params),
            rng=rng,
        )

    abstract = jax.eval_shape(init, rng)
    replicated = sharding.replicated(mesh)
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda leaf, s: leaf if masked(leaf) else s,
        abstract.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=masked,
    )
    teacher_shardings = None if abstract.teacher is None else param_shardings["encoder"]
    shardings = TrainState(
        replicated, param_shardings, opt_shardings, teacher_shardings, replicated
    )
    return StatePlan(abstract, shardings, tx, init)


def create_state(plan: StatePlan, mesh, rng: jax.Array) -> TrainState:
    """A freshly initialised state, every leaf created already sharded."""
    with sharding.activate(mesh):
        return jax.jit(plan.init, out_shardings=plan.shardings)(rng)


def apply_gradients(
    state: TrainState, grads, tx: optax.GradientTransformation, schedule: optax.Schedule
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser update; the state's step advances by one."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "grad_norm": optax.global_norm(grads),
        "finite": all_finite(grads, params),  # the teacher follows the parameters
        "lr": schedule(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_step(task, plan: StatePlan, mesh, *, donate: bool = True) -> Callable:
    """``task.step`` compiled for the plan's state on ``mesh``: (state, global batch) →
    (state, replicated metrics); the state is donated unless ``donate=False``."""
    return jax.jit(
        lambda state, batch: task.step(state, batch, plan.tx),
        in_shardings=(plan.shardings, sharding.batch_sharding(mesh)),
        out_shardings=(plan.shardings, sharding.replicated(mesh)),
        donate_argnums=0 if donate else (),
    )
