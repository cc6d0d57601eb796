"""The training loop: pod-mesh equality, exact resume after SIGKILL/SIGTERM, guards."""

import signal
import time

import jax
import numpy as np
import pytest

from asda_jax import checkpoints, sharding, train_lib
from asda_jax.data import datasets, pipeline
from tests import train_helpers as th


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    datasets.prepare("synthetic", root, clips_per_class=4)  # 30 train, 10 test clips
    return str(root)


# Long enough that a signal sent once step 3 is logged lands mid-run: a tiny step takes
# milliseconds, so an 8-step run could finish before the signal arrives.
RUN = {"num_train_steps": 100, "optim.total_steps": 100, "checkpoint_every": 25}


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
    recorded = th.losses(workdir)
    assert sorted(recorded) == sorted(expected)
    for step, values in recorded.items():
        assert values == [expected[step]] * len(values), (step, values, expected[step])


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


def test_nan_loss_stops_before_saving_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    train_lib.train(th.tiny_config(data_dir, num_train_steps=4), tmp_path)
    good = checkpoints.Checkpoints(tmp_path).restore(4, None)[0]
    exploding = th.tiny_config(data_dir, **{"optim.lr": 1e30})
    with pytest.raises(train_lib.TrainingStopped, match=r"the loss is (nan|inf)"):
        train_lib.train(exploding, tmp_path)
    assert saved_steps(tmp_path) == [2, 4]
    kept = checkpoints.Checkpoints(tmp_path).restore(4, None)[0]
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(good), strict=True):
        np.testing.assert_array_equal(a, b)


def test_collapse_stops_the_run_with_a_clear_message(data_dir, tmp_path):
    collapsing = th.tiny_config(
        data_dir, **{"pretrain.min_target_var": 100.0, "pretrain.collapse_check_after": 3}
    )
    with pytest.raises(train_lib.TrainingStopped, match="representation collapse: target_var"):
        train_lib.train(collapsing, tmp_path)
    assert saved_steps(tmp_path) == [2]


def test_three_steps_on_a_data_fsdp_tensor_mesh_equal_one_device(data_dir):
    task = train_lib.make_task(th.tiny_config(data_dir))
    host_batches = list(
        zip(range(3), iter(pipeline.make_pipeline(task.data_cfg, train=True)), strict=False)
    )
    results = []
    for mesh in (
        sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
        sharding.make_mesh((1, 1, 1), jax.devices()[:1]),
    ):
        state, shardings, tx = train_lib.new_state(task, mesh, jax.random.PRNGKey(0))
        step = jax.jit(
            lambda s, b, tx=tx: task.step(s, b, tx),
            in_shardings=(shardings, sharding.batch_sharding(mesh)),
            out_shardings=(shardings, sharding.replicated(mesh)),
        )
        with sharding.activate(mesh):
            for _, batch in host_batches:
                state, _ = step(state, pipeline.to_global(batch, mesh))
        results.append(jax.device_get(state))
    pod, single = results
    qk = pod.params["encoder"]["blocks_0"]["attn"]["qk"]["kernel"]
    assert int(pod.step) == 3 and qk.shape == (64, 4, 4, 16)
    for a, b in zip(jax.tree.leaves(pod), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_pretrain_as2m_runs_on_a_pod_style_mesh(tmp_path):
    from tests import data_fixtures as fx

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
        "--config.optim.total_steps=3",
        "--config.optim.warmup_steps=1",
        "--config.log_every=1",
        "--config.checkpoint_every=3",
    ]
    proc = th.launch_train(tmp_path / "run", flags)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert sorted(th.losses(tmp_path / "run")) == [1, 2, 3]
    assert saved_steps(tmp_path / "run") == [3]


def test_a_wrong_config_fails_before_compiling(data_dir, tmp_path):
    proc = th.launch_train(
        tmp_path,
        ["--config=configs/demo.py", *th.tiny_flags(data_dir, **{"data.target_frames": 70})],
    )
    assert proc.wait(timeout=120) == 2
    assert "not a multiple of the patch size 16" in proc.stderr.read()
    assert not (tmp_path / "checkpoints").exists() or not saved_steps(tmp_path)


def test_restore_target_places_state_on_the_mesh(data_dir, tmp_path):
    train_lib.train(th.tiny_config(data_dir, num_train_steps=2), tmp_path)
    task = train_lib.make_task(th.tiny_config(data_dir))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract, shardings, _, _ = train_lib.state_shardings(task, mesh, jax.random.PRNGKey(0))
    state, data_state = checkpoints.Checkpoints(tmp_path).restore(
        2, checkpoints.abstract_state(abstract, shardings)
    )
    kernel = state.params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert isinstance(data_state, dict) and data_state
