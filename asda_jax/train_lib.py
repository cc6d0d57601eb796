"""The training loop shared by pretraining and fine-tuning, and the pretraining task.

A *task* says what is trained (``init_params``, ``optimizer``, ``step``, ``check``);
``train`` does the rest the same way for every task: validate the config, build the
mesh and the input pipeline, create the state already sharded (or restore it with the
input iterator's position), run the jitted step with the state donated, and write
metrics (clu writers + ``metrics.jsonl``), progress and checkpoints. A NaN loss or a
collapse stops the run before the bad state is saved; SIGTERM (a TPU VM's preemption
notice) saves the current step first.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from asda_jax import checkpoints, config_lib, objectives, optim, sharding
from asda_jax import model as model_lib
from asda_jax.data import pipeline


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
    if not np.isfinite(metrics["loss"]):
        raise TrainingStopped(
            f"step {step}: the loss is {metrics['loss']}; stopping without saving this state"
        )


# ---------------------------------------------------------------------------- pretraining


class PretrainTask:
    """Self-supervised pretraining: student encoder + CNN decoder, EMA teacher."""

    def __init__(self, config):
        self.model_cfg = config_lib.model_config(config)
        self.mask_cfg = config_lib.mask_config(config)
        self.pre_cfg = config_lib.pretrain_config(config)
        self.data_cfg = config_lib.input_config(config)
        self.optim_cfg = config_lib.optim_config(config)
        self.encoder = model_lib.Encoder(self.model_cfg)
        self.decoder = model_lib.Decoder(self.model_cfg)
        self.grid = objectives.grid_shape(self.data_cfg.target_frames, self.model_cfg)

    def init_params(self, rng: jax.Array):
        """Boxed (logically named) student parameters."""
        enc_key, dec_key = jax.random.split(rng)
        spec = jnp.zeros((1, self.data_cfg.target_frames, self.model_cfg.num_mel_bins))
        grid = jnp.zeros((1, *self.grid, self.model_cfg.embed_dim))
        return {
            "encoder": self.encoder.init(enc_key, spec)["params"],
            "decoder": self.decoder.init(dec_key, grid)["params"],
        }

    def optimizer(self, params) -> optax.GradientTransformation:
        return optim.make_optimizer(self.optim_cfg, params)

    def init_teacher(self, params):
        return params["encoder"]  # the teacher starts as an exact copy

    def load_initial(self, state: TrainState) -> TrainState:
        return state  # pretraining starts from scratch

    def step(self, state: TrainState, batch: dict, tx) -> tuple[TrainState, dict]:
        spec, _ = pipeline.spectrograms(batch, self.data_cfg)
        key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            return objectives.pretraining_step_loss(
                self.encoder, self.decoder, params, state.teacher, spec, key,
                self.mask_cfg, self.pre_cfg,
            )  # fmt: skip

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        decay = objectives.ema_decay(step, self.pre_cfg)
        teacher = objectives.ema_update(state.teacher, params["encoder"], decay)
        metrics |= {
            "grad_norm": optax.global_norm(grads),
            "lr": optim.schedule(self.optim_cfg)(state.step),
            "ema_decay": decay,
        }
        new_state = state.replace(step=step, params=params, opt_state=opt_state, teacher=teacher)
        return new_state, metrics

    def check(self, step: int, metrics: dict) -> None:
        check_finite(step, metrics)
        cfg = self.pre_cfg
        if step < cfg.collapse_check_after:
            return
        if metrics["target_var"] < cfg.min_target_var or metrics["pred_var"] < cfg.min_pred_var:
            raise TrainingStopped(
                f"step {step}: representation collapse: target_var {metrics['target_var']:.4g} "
                f"(min {cfg.min_target_var}), pred_var {metrics['pred_var']:.4g} "
                f"(min {cfg.min_pred_var}); stopping without saving this state"
            )


def make_task(config):
    if config.task == "pretrain":
        return PretrainTask(config)
    from asda_jax import finetune

    return finetune.FinetuneTask(config)


# ---------------------------------------------------------------------------- state


def state_shardings(task, mesh, rng):
    """(abstract TrainState, its shardings, init function, optimiser) without allocating."""
    boxed = jax.eval_shape(task.init_params, rng)
    param_shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
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
    return abstract, shardings, init, tx


def initial_state(task, mesh, seed: int, ckpt: checkpoints.Checkpoints, iterator):
    """(state, shardings, tx, first step): restored from the latest checkpoint, or new."""
    rng = jax.random.PRNGKey(seed)
    latest = ckpt.latest_step()
    if latest is not None:
        abstract, shardings, _, tx = state_shardings(task, mesh, rng)
        state, data_state = ckpt.restore(latest, checkpoints.abstract_state(abstract, shardings))
        iterator.set_state(data_state)
        logging.info("resumed from step %d of %s", latest, ckpt.directory)
        return state, shardings, tx, latest
    state, shardings, tx = new_state(task, mesh, rng)
    return task.load_initial(state), shardings, tx, 0


def new_state(task, mesh, rng):
    """(a freshly initialised TrainState created already sharded, its shardings, tx)."""
    _, shardings, init, tx = state_shardings(task, mesh, rng)
    with sharding.activate(mesh):
        state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings, tx


# ---------------------------------------------------------------------------- loop


class StopRequest:
    """Set by SIGTERM; on several hosts, any host's request stops them all."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def __call__(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def log_environment(config) -> None:
    logging.info(
        "process %d of %d; %d local / %d global devices on %s; task %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.default_backend(),
        config.task,
    )


class MetricsLog:
    """TensorBoard + console through clu, and ``metrics.jsonl`` for scripts (host 0)."""

    def __init__(self, workdir: Path):
        self._host0 = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(
            str(workdir / "tensorboard"), just_logging=not self._host0
        )
        self._jsonl = workdir / "metrics.jsonl"

    def write(self, step: int, scalars: dict) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        self.writer.write_scalars(step, scalars)
        if self._host0:
            with open(self._jsonl, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def write_config(workdir: Path, config) -> None:
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def train(config, workdir: str | Path):
    """Runs (or resumes) the configured task in ``workdir``; returns the final state."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_environment(config)
    config_lib.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
    task = make_task(config)
    mesh = sharding.make_mesh(dict(config.mesh), dcn_shape=config.get("mesh_dcn"))
    iterator = iter(pipeline.make_pipeline(task.data_cfg, train=True))
    ckpt = checkpoints.Checkpoints(workdir, max_to_keep=config.keep_checkpoints)
    state, shardings, tx, start = initial_state(task, mesh, config.seed, ckpt, iterator)
    write_config(workdir, config)
    total = config.num_train_steps
    step_fn = jax.jit(
        lambda s, b: task.step(s, b, tx),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    log = MetricsLog(workdir)
    progress = periodic_actions.ReportProgress(num_train_steps=total, writer=log.writer)
    profile = _profiler(config, workdir)
    stop = StopRequest()
    batches = pipeline.DevicePrefetch(iterator, mesh)
    pending = None
    try:
        with sharding.activate(mesh):
            for step in range(start, total):
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = step_fn(state, next(batches))
                done = step + 1
                if pending is not None:  # checked one step late: dispatch stays ahead
                    _check_and_log(task, log, config, *pending)
                pending = (done, metrics)
                stopping = stop()
                if done % config.checkpoint_every == 0 or done == total or stopping:
                    _check_and_log(task, log, config, *pending)
                    pending = None
                    ckpt.save(done, state, batches.get_state())
                progress(done)
                if profile is not None:
                    profile(done)
                if stopping:
                    break
            if pending is not None:
                _check_and_log(task, log, config, *pending)
    finally:
        stop.restore()
        batches.close()
        ckpt.close()  # waits for pending saves and surfaces their errors
        log.close()
    return state, task, mesh


def _check_and_log(task, log: MetricsLog, config, step: int, metrics) -> None:
    values = jax.device_get(metrics)
    task.check(step, values)
    if step % config.log_every == 0 or step == config.num_train_steps:
        log.write(step, values)


def _profiler(config, workdir: Path):
    if not config.get("profile_steps"):
        return None
    return periodic_actions.Profile(
        logdir=str(workdir / "profile"),
        num_profile_steps=config.profile_steps,
        first_profile=config.get("profile_first_step", 10),
    )
