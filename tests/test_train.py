"""The training loop: pod-mesh equality, exact resume after SIGKILL/SIGTERM, guards,
the run length, skip counts."""

import json
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asda_jax import checkpoints, config_lib, hardware, optim, sharding, train_lib, train_state
from asda_jax.data import datasets, pipeline
from asda_jax.testing import fixtures as fx
from tests import train_helpers as th


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    datasets.prepare("synthetic", root, clips_per_class=4)  # 30 train, 10 test clips
    return str(root)


# Long enough that a signal sent once step 3 is logged lands mid-run: a tiny step takes
# milliseconds, so an 8-step run could finish before the signal arrives.
RUN = {"num_train_steps": 100, "checkpoint_every": 25}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """Losses of a run that nothing interrupts."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    train_lib.train(th.tiny_config(data_dir, **RUN), workdir)
    recorded = th.losses(workdir)
    assert sorted(recorded) == list(range(1, RUN["num_train_steps"] + 1))
    return {step: values[0] for step, values in recorded.items()}


def saved_steps(workdir) -> list[int]:
    return checkpoints.Checkpoints(workdir).all_steps()


def wait_until(proc, reached, what: str, timeout: float = 240.0) -> None:
    """Polls ``reached()`` while the training process runs."""
    deadline = time.time() + timeout
    while not reached():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"{what} not reached in {timeout} s")
        time.sleep(0.05)


def logged_step(workdir) -> int:
    return max(th.losses(workdir), default=0)


def assert_same_losses(workdir, expected) -> None:
    """Every step recorded once (a resumed run drops the rows it computes again), with
    the uninterrupted run's loss bit for bit."""
    recorded = th.losses(workdir)
    assert sorted(recorded) == sorted(expected)
    for step, values in recorded.items():
        assert values == [expected[step]], (step, values, expected[step])


@pytest.mark.subprocess
def test_sigkill_resumes_from_the_last_complete_checkpoint_exactly(
    data_dir, uninterrupted, tmp_path
):
    flags = th.tiny_flags(data_dir, **RUN)
    proc = th.launch_train(tmp_path, ["--config=configs/demo.py", *flags])
    wait_until(proc, lambda: saved_steps(tmp_path), "a complete checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivors = saved_steps(tmp_path)
    assert survivors and max(survivors) < RUN["num_train_steps"]  # only complete ones listed
    train_lib.train(th.tiny_config(data_dir, **RUN), tmp_path)
    assert RUN["num_train_steps"] in saved_steps(tmp_path)
    assert_same_losses(tmp_path, uninterrupted)  # replayed steps equal too, bit for bit


@pytest.mark.subprocess
def test_sigterm_saves_first_then_the_run_resumes_exactly(data_dir, uninterrupted, tmp_path):
    no_periodic_saves = {**RUN, "checkpoint_every": 1000}
    proc = th.launch_train(
        tmp_path, ["--config=configs/demo.py", *th.tiny_flags(data_dir, **no_periodic_saves)]
    )
    wait_until(proc, lambda: logged_step(tmp_path) >= 3, "step 3")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    (stopped_at,) = saved_steps(tmp_path)
    assert 3 <= stopped_at < RUN["num_train_steps"]
    train_lib.train(th.tiny_config(data_dir, **RUN), tmp_path)
    assert_same_losses(tmp_path, uninterrupted)


@pytest.mark.train
def test_nan_loss_stops_before_saving_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    train_lib.train(th.tiny_config(data_dir, num_train_steps=4), tmp_path)
    good = checkpoints.Checkpoints(tmp_path).restore(4, None)[0]
    exploding = th.tiny_config(data_dir, **{"optim.lr": 1e30})
    with pytest.raises(train_state.TrainingStopped, match=r"the loss is (nan|inf)"):
        train_lib.train(exploding, tmp_path)
    assert saved_steps(tmp_path) == [2, 4]
    kept = checkpoints.Checkpoints(tmp_path).restore(4, None)[0]
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(good), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.train
def test_a_non_finite_gradient_stops_the_run_before_its_state_is_saved(
    data_dir, tmp_path, monkeypatch
):
    """An inf in one gradient at a checkpoint step, with a finite loss: the run stops
    there and its newest checkpoint is the one before, finite."""
    bad_update, apply = 4, train_state.apply_gradients

    def poisoned(state, grads, tx, schedule):
        leaves, tree = jax.tree.flatten(grads)
        leaves[0] = jnp.where(state.step + 1 == bad_update, jnp.inf, leaves[0])
        return apply(state, jax.tree.unflatten(tree, leaves), tx, schedule)

    monkeypatch.setattr(train_state, "apply_gradients", poisoned)
    stopped = rf"step {bad_update}: a gradient or an updated parameter is not finite"
    with pytest.raises(train_state.TrainingStopped, match=stopped):
        train_lib.train(th.tiny_config(data_dir, num_train_steps=8), tmp_path)
    assert saved_steps(tmp_path) == [2]
    state = checkpoints.Checkpoints(tmp_path).restore(2, None)[0]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))


@pytest.mark.train
def test_each_logged_step_reports_its_speed_and_a_profile_is_written(data_dir, tmp_path):
    config = th.tiny_config(data_dir, num_train_steps=6, profile_steps=(3, 4))
    result = train_lib.train(config, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    timed = [x for x in lines if "step_seconds" in x]
    assert [x["step"] for x in timed] == [2, 3, 4, 5, 6]  # step 1 (compiling) starts the clock
    batch, devices = result.task.data_cfg.batch_size, result.mesh.size
    flops = result.task.step_flops(batch)
    for x in timed:
        assert x["step_seconds"] > 0 and 0 <= x["input_wait_share"] <= 1
        assert x["clips_per_s"] == pytest.approx(batch / x["step_seconds"])
        assert x["tflops_per_device"] == pytest.approx(flops / x["step_seconds"] / devices / 1e12)
        assert "mfu" not in x  # no published peak for a CPU
    assert any(x.get("input_clips_per_s", 0) > 0 for x in timed)
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))


@pytest.mark.train
def test_collapse_stops_the_run_with_a_clear_message(data_dir, tmp_path):
    collapsing = th.tiny_config(
        data_dir, **{"pretrain.min_target_var": 100.0, "pretrain.collapse_check_after": 3}
    )
    with pytest.raises(train_state.TrainingStopped, match="representation collapse: target_std"):
        train_lib.train(collapsing, tmp_path)
    assert saved_steps(tmp_path) == [2]


def test_three_steps_on_a_data_fsdp_tensor_mesh_equal_one_device(data_dir):
    task = th.task_on_cpu(th.tiny_config(data_dir))
    host_batches = list(
        zip(range(3), iter(pipeline.make_pipeline(task.data_cfg, train=True)), strict=False)
    )
    results = []
    for mesh in (
        sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
        sharding.make_mesh((1, 1, 1), jax.devices()[:1]),
    ):
        plan = train_state.plan_state(task, mesh, jax.random.PRNGKey(0))
        state = train_state.create_state(plan, mesh, jax.random.PRNGKey(0))
        step = train_state.jit_step(task, plan, mesh, donate=False)
        with sharding.activate(mesh):
            for _, batch in host_batches:
                state, _ = step(state, pipeline.to_global(batch, mesh))
        results.append(jax.device_get(state))
    pod, single = results
    qk = pod.params["encoder"]["blocks_0"]["attn"]["qk"]["kernel"]
    assert int(pod.step) == 3 and qk.shape == (64, 4, 4, 16)
    for a, b in zip(jax.tree.leaves(pod), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.subprocess
def test_pretrain_as2m_runs_on_a_pod_style_mesh(tmp_path):
    from asda_jax.testing import fixtures as fx

    fx.audioset_segments_tree(tmp_path / "as")
    datasets.prepare("audioset", tmp_path / "data", source_dir=tmp_path / "as")
    flags = [
        "--config=configs/pretrain_as2m.py:mesh=cpu,model=tiny",
        f"--config.data.data_dir={tmp_path / 'data'}",
        "--config.data.split=balanced_train",
        "--config.data.batch_size=4",
        "--config.data.target_frames=64",
        "--config.data.fbank_on=device",  # as on TPU pods: waveforms in, fbank in the step
        "--config.mask.clone_batch=2",
        "--config.pretrain.average_top_k_layers=2",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
        "--config.num_train_steps=3",
        "--config.optim.warmup_steps=1",
        "--config.log_every=1",
        "--config.checkpoint_every=3",
    ]
    proc = th.launch_train(tmp_path / "run", flags)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert sorted(th.losses(tmp_path / "run")) == [1, 2, 3]
    assert saved_steps(tmp_path / "run") == [3]


class Compilations:
    """Counts XLA compilations (jax.monitoring's backend-compile events) while open."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __enter__(self):
        self.count = 0
        self._open = True
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **kwargs):
        if self._open and event == self.EVENT:
            self.count += 1

    def __exit__(self, *exc):
        self._open = False


@pytest.mark.subprocess
def test_a_wrong_config_fails_before_compiling(data_dir, tmp_path):
    wrong = {"data.target_frames": 70}
    proc = th.launch_train(
        tmp_path, ["--config=configs/demo.py", *th.tiny_flags(data_dir, **wrong)]
    )
    assert proc.wait(timeout=120) == 2
    assert "not a multiple of the patch size 16" in proc.stderr.read()
    assert not (tmp_path / "checkpoints").exists() or not saved_steps(tmp_path)
    refused = pytest.raises(config_lib.ConfigError, match="not a multiple of the patch size")
    with Compilations() as compiled, refused:
        train_lib.train(th.tiny_config(data_dir, **wrong), tmp_path / "in_process")
    assert compiled.count == 0
    with Compilations() as compiled:  # the counter sees a compilation when there is one
        jax.jit(lambda x: x * 3.0 + 1.0)(np.float32(2.0)).block_until_ready()
    assert compiled.count == 1


def test_the_schedule_follows_the_run_length(data_dir):
    config = th.tiny_config(data_dir)
    config.num_train_steps = 40  # as --config.num_train_steps=40 alone
    cfg = config_lib.read(config, hardware.HOST).optim
    assert cfg.decay_steps == 40
    lr = optim.schedule(cfg)
    assert float(lr(config.optim.warmup_steps)) == pytest.approx(config.optim.lr)
    assert float(lr(40)) == pytest.approx(cfg.min_lr, abs=1e-12)  # decayed at the run's end
    assert float(lr(20)) > float(lr(30)) > float(lr(40))
    config.optim.decay_steps = 80  # a longer decay, said explicitly
    assert config_lib.read(config, hardware.HOST).optim.decay_steps == 80
    config.optim.decay_steps = 30
    with pytest.raises(config_lib.ConfigError, match=r"decay_steps \(30\) ends before"):
        config_lib.read(config, hardware.HOST)
    unknown = th.tiny_config(data_dir)
    unknown.optim.total_steps = 800_000  # no such field: the run length is the one source
    with pytest.raises(
        config_lib.ConfigError, match=r"unknown OptimConfig fields \['total_steps'\]"
    ):
        config_lib.read(unknown, hardware.HOST)


@pytest.mark.train
def test_a_run_reports_the_clips_it_skipped(tmp_path, caplog):
    fx.class_folders_tree(tmp_path / "src", per_class=4)  # 8 clips, one undecodable
    fx.CorruptFolder(
        data_dir=str(tmp_path / "data"), source_dir=tmp_path / "src"
    ).download_and_prepare(file_format="array_record")
    config = th.tiny_config(
        str(tmp_path / "data"),
        **{"data.dataset": "corrupt_folder", "num_train_steps": 2},
    )
    with caplog.at_level("INFO"):
        train_lib.train(config, tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    counts = [entry["skipped/unreadable"] for entry in logged]
    assert counts == sorted(counts) and counts[-1] >= 1  # 16 clips read: the bad one, once+
    assert all(entry["skipped/missing"] == 0 for entry in logged)
    final = re.search(
        r"clips skipped while reading, all hosts: \{.*'unreadable': (\d+)", caplog.text
    )
    assert final and int(final.group(1)) >= counts[-1]  # the final log line counts them too


@pytest.mark.train
def test_restore_target_places_state_on_the_mesh(data_dir, tmp_path):
    train_lib.train(th.tiny_config(data_dir, num_train_steps=2), tmp_path)
    task = th.task_on_cpu(th.tiny_config(data_dir))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    plan = train_state.plan_state(task, mesh, jax.random.PRNGKey(0))
    state, data_state = checkpoints.Checkpoints(tmp_path).restore(2, plan.restore_target())
    kernel = state.params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert isinstance(data_state, dict) and data_state
