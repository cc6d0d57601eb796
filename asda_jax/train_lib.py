"""The training loop, the same for every task.

``train`` reads the config for the chip of the devices present (``config_lib.validate``,
once), builds the mesh, the task (``pretraining`` or ``finetuning``) and the input
pipeline,
creates the state already sharded (or restores it with the input iterator's
position), runs the jitted step with the state donated, and writes metrics (clu
writers + ``metrics.jsonl``, with the clips skipped while reading), progress and
checkpoints. A NaN loss or a collapse stops the run before the bad state is saved;
SIGTERM (a TPU VM's preemption notice) saves the current step first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from asda_jax import (
    audio,
    checkpoints,
    config_lib,
    finetuning,
    hardware,
    optim,
    pretraining,
    report,
    selfcheck,
    sharding,
    storage,
    throughput,
    train_state,
)
from asda_jax.data import pipeline


def make_task(config: config_lib.RunConfig):
    """The task of a run (pretraining, or fine-tuning and linear probing)."""
    task = pretraining.PretrainTask if config.task == "pretrain" else finetuning.FinetuneTask
    return task(config)


SHARED_STORAGE = "storage every host shares (a gs:// URL, or a shared file system)"
WORKDIR_TOKEN_FILE = "workdir_token"


def require_one_workdir(workdir: epath.Path) -> None:
    """Stops a multi-process run before it starts unless every process sees the one
    workdir: process 0 writes a random token into it, and every process must read that
    token back. A workdir on each host's own disk would train, each host keeping its
    own files, and after a preemption onto fresh VMs restart from step 0 unnoticed."""
    if jax.process_count() == 1:
        return
    token = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(8), np.int32))
    written = " ".join(map(str, np.asarray(token).tolist()))
    if jax.process_index() == 0:
        (workdir / WORKDIR_TOKEN_FILE).write_text(written)
    multihost_utils.sync_global_devices("workdir token written")
    sees = np.bool_(_reads_back(workdir / WORKDIR_TOKEN_FILE, written))
    every = np.asarray(multihost_utils.process_allgather(sees)).reshape(-1).tolist()
    blind = [i for i, seen in enumerate(every) if not seen]
    if blind:
        raise config_lib.ConfigError(
            f"processes {blind} do not see the token process 0 wrote into {workdir}: each "
            f"host has a workdir of its own, and after a preemption each would start again "
            f"from step 0. Every host must see one workdir, on {SHARED_STORAGE}"
        )


def _reads_back(token_file: epath.Path, written: str, patience_s: float = 30.0) -> bool:
    """Whether ``token_file`` holds ``written``, asked again for ``patience_s``: a shared
    file system may serve a cached "no such file" (NFS keeps one up to a minute)."""
    deadline = time.monotonic() + patience_s
    while True:
        if token_file.is_file() and token_file.read_text() == written:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)


def agreed_latest_step(ckpt: checkpoints.Checkpoints) -> int | None:
    """The latest checkpoint's step, the same on every process; processes that see
    different ones stop the run before it starts."""
    latest = ckpt.latest_step()
    if jax.process_count() == 1:
        return latest
    mine = np.int64(-1 if latest is None else latest)
    seen = np.asarray(multihost_utils.process_allgather(mine)).tolist()
    if len(set(seen)) > 1:
        raise config_lib.ConfigError(
            f"the processes see different latest checkpoints in {ckpt.directory} "
            f"(by process, -1 for none: {seen}): every host must see one workdir, on "
            f"{SHARED_STORAGE}"
        )
    return latest


def initial_state(task, mesh, seed: int, ckpt: checkpoints.Checkpoints, iterator):
    """(state, plan, first step): restored from the latest checkpoint, or new."""
    rng = jax.random.PRNGKey(seed)
    plan = train_state.plan_state(task, mesh, rng)
    latest = agreed_latest_step(ckpt)
    if latest is not None:
        state, data_state = ckpt.restore(latest, plan.restore_target())
        iterator.set_state(data_state)
        logging.info("resumed from step %d of %s", latest, ckpt.directory)
        return state, plan, latest
    return task.load_initial(train_state.create_state(plan, mesh, rng)), plan, 0


class StopRequest:
    """A preemption notice (SIGTERM): the step every process stops and saves at.

    One process: its own SIGTERM handler. Several: JAX's preemption service, which
    catches SIGTERM in any process and agrees on a step all of them reach (the largest
    step any has started, plus one) without a collective on every step.
    """

    def __init__(self):
        self.requested = False
        self._shared = jax.process_count() > 1
        if not self._shared:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def __call__(self, step: int) -> bool:
        """Whether the run stops after ``step``; every process calls it at every step."""
        if self._shared:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self) -> None:
        if not self._shared:
            signal.signal(signal.SIGTERM, self._previous)


def log_environment(chip: hardware.Chip) -> None:
    logging.info(
        "process %d of %d; %d local / %d global devices, %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        chip.description,
    )


def log_weight_decay(params, cfg: optim.OptimConfig) -> None:
    """Which parameters weight decay leaves alone, blocks folded into one pattern."""
    exempt = optim.exempt_from_decay(params, cfg)
    patterns = sorted({re.sub(r"_\d+/", "_*/", path) for path in exempt})
    tensors = len(jax.tree.leaves(params))
    logging.info(
        "weight decay %g on %d of %d tensors; exempt: %s",
        cfg.weight_decay,
        tensors - len(exempt),
        tensors,
        ", ".join(patterns) or "none",
    )


def skipped_so_far(stats: pipeline.ReadStats) -> dict[str, int]:
    """Clips skipped while reading, per reason, summed over the hosts (call on all)."""
    reasons = audio.AudioError.REASONS
    counts = np.array([stats.skipped.get(r, 0) for r in reasons])
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
    return dict(zip(reasons, counts.tolist(), strict=True))


METRICS_FILE = report.METRICS_FILE


class MetricsLog:
    """TensorBoard + console through clu, and ``metrics.jsonl`` for scripts (host 0),
    written into ``stage`` (a remote workdir's local stand-in) and synced at each write."""

    def __init__(self, stage: storage.Stage):
        self._host0 = jax.process_index() == 0
        self._stage = stage
        self.writer = metric_writers.create_default_writer(
            str(stage.local / "tensorboard"), just_logging=not self._host0
        )
        self._jsonl = stage.local / METRICS_FILE

    def write(self, step: int, scalars: dict) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        self.writer.write_scalars(step, scalars)
        if self._host0:
            with open(self._jsonl, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
            if self._stage.remote:
                self.writer.flush()
                self._stage.sync()

    def keep_until(self, step: int) -> None:
        """Drops the rows of steps after ``step`` (a resumed run's checkpoint): the run
        computes them again, and each step is then recorded once."""
        if not self._host0 or not self._jsonl.is_file():
            return
        lines = self._jsonl.read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            self._jsonl.write_text("".join(kept))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
        self._stage.close()


def write_config(workdir: epath.Path, config) -> None:
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


class TrainResult(NamedTuple):
    state: train_state.TrainState  # the last step's state
    task: object  # the PretrainTask or FinetuneTask that was trained (its config: .config)
    mesh: jax.sharding.Mesh


def train(config, workdir: str | os.PathLike) -> TrainResult:
    """Runs (or resumes) the configured task in ``workdir`` (a folder or a ``gs://``
    URL), until ``num_train_steps`` or a SIGTERM; returns the final state with the task
    and mesh it ran on."""
    workdir = storage.path(workdir)
    stage = storage.Stage(  # makes the workdir (or checks its bucket) first
        workdir, pull=(METRICS_FILE,) if jax.process_index() == 0 else ()
    )
    require_one_workdir(workdir)
    run_config, mesh = validated_setup(config)
    run_config, checked = self_checked(run_config, mesh, workdir)
    task = make_task(run_config)
    stats = pipeline.ReadStats()
    iterator = iter(pipeline.make_pipeline(task.data_cfg, train=True, stats=stats))
    ckpt = checkpoints.Checkpoints(workdir, max_to_keep=run_config.keep_checkpoints)
    state, plan, start = initial_state(task, mesh, run_config.seed, ckpt, iterator)
    log_weight_decay(plan.abstract.params, task.optim_cfg)
    write_config(workdir, config)
    _warn_if_schedule_outlasts_run(run_config)
    batches = pipeline.DevicePrefetch(iterator, mesh)
    clock = throughput.StepClock(
        step_flops=task.step_flops(run_config.data.batch_size),
        global_batch=run_config.data.batch_size,
        devices=mesh.size,
        peak_flops=run_config.chip.peak_flops,
        production=batches.production,
    )
    log = MetricsLog(stage)
    log.keep_until(start)
    run = _Run(run_config, task, ckpt, log, stats, StopRequest(), clock, checked)
    try:
        with sharding.activate(mesh):
            state = run.steps(state, train_state.jit_step(task, plan, mesh), batches, start, stage)
    finally:
        run.close()
        batches.close()
    logging.info(
        "stopped at step %d of %d; clips skipped while reading, all hosts: %s",
        int(state.step),
        run_config.num_train_steps,
        skipped_so_far(stats),
    )
    return TrainResult(state, task, mesh)


def validated_setup(config) -> tuple[config_lib.RunConfig, jax.sharding.Mesh]:
    """(run config, mesh) of a config read for the devices present."""
    chip = hardware.of_devices(jax.devices())
    log_environment(chip)
    run = config_lib.validate(
        config, chip=chip, device_count=jax.device_count(), process_count=jax.process_count()
    )
    return run, sharding.make_mesh(run.mesh, dcn_shape=run.mesh_dcn)


def self_checked(
    run: config_lib.RunConfig, mesh: jax.sharding.Mesh, workdir: epath.Path
) -> tuple[config_lib.RunConfig, dict[str, float]]:
    """Where the run checks its kernels (``selfcheck.wanted``): each against its XLA form
    on this host's devices, the report in the workdir, and the run with every kernel
    that any host dropped replaced by its XLA form (all hosts must compile one
    program); with the check's metrics. Elsewhere: the run as it is, no metrics."""
    if not selfcheck.wanted(run):
        return run, {}
    checks = selfcheck.check_run(run, mesh)
    logging.info("kernels against their XLA forms on %s:\n%s", run.chip.description,
                 selfcheck.table(checks))  # fmt: skip
    off = agreed_union(selfcheck.dropped(run, checks), selfcheck.KERNELS)
    for c in checks:
        if c.error is not None:
            logging.error(
                "the %s kernel (%s) raised at %s: %s; this run uses the XLA form",
                c.kernel, c.form, c.where, c.error,
            )  # fmt: skip
        elif not c.agrees:
            logging.error(
                "the %s kernel (%s) disagrees with its XLA form at %s (error against float32: "
                "forward %.2g, gradients %s; bounds %.2g, %.2g): this run uses the XLA form",
                c.kernel, c.form, c.where, c.forward_error, c.gradient_error,
                c.forward_bound, c.gradient_bound,
            )  # fmt: skip
        elif c.slower:
            logging.warning(
                "the %s kernel (%s) at %s takes %.3g ms, its XLA form %.3g ms%s", c.kernel,
                c.form, c.where, c.kernel_ms, c.xla_ms,
                ": dropped (selfcheck=fastest)" if c.kernel in off else "",
            )  # fmt: skip
    if jax.process_index() == 0:
        report = selfcheck.report(checks, off, run.chip.description)
        selfcheck.write_report(workdir, report)
    return selfcheck.with_fallbacks(run, off), selfcheck.scalars(checks, off)


def agreed_union(names: list[str], known: tuple[str, ...]) -> list[str]:
    """The ``names`` (of ``known``) any process holds, the same list on every process."""
    if jax.process_count() == 1:
        return sorted(names)
    mine = np.array([k in names for k in known])
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(known))
    return [k for k, held in zip(known, every.any(axis=0), strict=True) if held]


@dataclasses.dataclass
class _Run:
    """One process's run of the steps: checks, metrics, checkpoints, stop requests."""

    config: config_lib.RunConfig
    task: Any
    ckpt: checkpoints.Checkpoints
    log: MetricsLog
    stats: pipeline.ReadStats
    stop: StopRequest
    clock: throughput.StepClock
    once: dict  # written with the first logged step's metrics (the self-check's)

    def steps(self, state, step_fn, batches, start: int, stage: storage.Stage):
        """Steps from ``start`` to the end (or a stop request); the final state. A
        profile is traced into ``stage`` and synced to the workdir when it stops."""
        total, pending = self.config.num_train_steps, None
        progress = periodic_actions.ReportProgress(num_train_steps=total, writer=self.log.writer)
        first_traced, last_traced = self.config.profile_steps or (0, 0)
        tracing = False
        for step in range(start, total):
            done = step + 1
            if done == first_traced:
                jax.profiler.start_trace(str(stage.local / "profile"))
                tracing = True
            waiting = time.perf_counter()
            batch = next(batches)
            self.clock.waited(time.perf_counter() - waiting)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = step_fn(state, batch)
            if tracing and done == last_traced:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                stage.sync()
                tracing = False
                logging.info(
                    "traced steps %d-%d into %s", first_traced, done, stage.target / "profile"
                )
            if pending is not None:  # checked one step late: dispatch stays ahead
                self.report(*pending)
            pending = (done, metrics)
            stopping = self.stop(done)
            if done % self.config.checkpoint_every == 0 or done == total or stopping:
                self.report(*pending)
                pending = None
                self.ckpt.save(done, state, batches.get_state())
            progress(done)
            if stopping:
                break
        if tracing:  # stopped before the last traced step
            jax.profiler.stop_trace()
        if pending is not None:
            self.report(*pending)
        return state

    def report(self, step: int, metrics) -> None:
        """Checks a step's metrics (stopping a bad run) and logs them on logging steps."""
        values = jax.device_get(metrics)
        self.clock.arrived(step)
        self.task.check(step, values)
        if step % self.config.log_every == 0 or step == self.config.num_train_steps:
            skipped = {f"skipped/{r}": n for r, n in skipped_so_far(self.stats).items()}
            self.log.write(step, values | skipped | self.clock.lap(step) | self.once)
            self.once = {}

    def close(self) -> None:
        self.stop.restore()
        self.ckpt.close()  # waits for pending saves and surfaces their errors
        self.log.close()


def _warn_if_schedule_outlasts_run(config: config_lib.RunConfig) -> None:
    decay = config.optim.decay_steps
    if decay != config.num_train_steps:
        logging.warning(
            "optim.decay_steps %d: the schedule decays over more steps than this run's %d",
            decay,
            config.num_train_steps,
        )
