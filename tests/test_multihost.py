"""Multi-host training for real, on one machine: two processes joined on loopback."""

import re
import signal
import socket
import time

import jax
import numpy as np
import pytest

from asda_jax import checkpoints, cli, sharding, train_lib, train_state
from asda_jax.data import datasets
from tests import train_helpers as th

# when a pair of processes counts as hung: a guard, not a timing (a pair that trains in
# about 3 min on an idle 2-core machine took over 5 under load)
HUNG_AFTER_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_pair(workdir, data_dir, steps: int, checkpoint_every: int = 3):
    """Two processes × 4 simulated CPU devices = the same 8 devices as one test process."""
    address = f"127.0.0.1:{free_port()}"
    extra = {
        "num_train_steps": steps,
        "optim.decay_steps": max(steps, 8),
        "checkpoint_every": checkpoint_every,
        "num_processes": 2,
    }
    return [
        th.launch_train(
            workdir,
            [
                "--config=configs/demo.py",
                *th.tiny_flags(data_dir, **extra),
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
        )
        for i in range(2)
    ]


def wait_all(procs, timeout=HUNG_AFTER_S):
    for proc in procs:
        code = proc.wait(timeout=timeout)
        assert code == 0, proc.stderr.read()[-3000:]


def restore_on_one_device(workdir, step: int, data_dir: str):
    """A checkpoint restored onto this process's first device, whoever saved it."""
    task = th.task_on_cpu(th.tiny_config(data_dir))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    plan = train_state.plan_state(task, mesh, jax.random.PRNGKey(0))
    return checkpoints.Checkpoints(workdir).restore(step, plan.restore_target())[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    datasets.prepare("synthetic", root, clips_per_class=4)
    return str(root)


@pytest.mark.subprocess
def test_two_processes_train_like_one_and_resume_from_their_checkpoint(data_dir, tmp_path):
    single = tmp_path / "single"
    train_lib.train(
        th.tiny_config(data_dir, num_train_steps=3, checkpoint_every=3, **{"optim.decay_steps": 8}),
        single,
    )
    pair = tmp_path / "pair"
    wait_all(launch_pair(pair, data_dir, steps=3))
    assert checkpoints.Checkpoints(pair).all_steps() == [3]
    expected = restore_on_one_device(single, 3, data_dir)
    got = restore_on_one_device(pair, 3, data_dir)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    for step in (1, 2, 3):
        assert th.losses(pair)[step][0] == pytest.approx(th.losses(single)[step][0], rel=1e-5)

    wait_all(launch_pair(pair, data_dir, steps=5))  # the pair resumes from step 3
    assert sorted(th.losses(pair)) == [1, 2, 3, 4, 5]
    assert 5 in checkpoints.Checkpoints(pair).all_steps()


@pytest.mark.subprocess
def test_a_run_whose_process_count_disagrees_with_its_config_fails_at_start(data_dir, tmp_path):
    proc = th.launch_train(
        tmp_path, ["--config=configs/demo.py", *th.tiny_flags(data_dir, num_processes=2)]
    )
    assert proc.wait(timeout=HUNG_AFTER_S) == 2
    assert "config expects 2 processes" in proc.stderr.read()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_scheduled_process_counts_are_read_from_each_scheduler():
    assert cli.scheduled_processes({}) is None
    assert cli.scheduled_processes({"SLURM_STEP_NUM_TASKS": "1", "PMI_SIZE": ""}) is None
    step = {"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2"}
    assert cli.scheduled_processes(step) == ("SLURM_STEP_NUM_TASKS", 2)
    # One process of an 8-task allocation (a batch script, or srun -n 1) is one process.
    assert cli.scheduled_processes({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert cli.scheduled_processes({"SLURM_NTASKS": "8"}) is None
    assert cli.scheduled_processes({"OMPI_COMM_WORLD_SIZE": "16"}) == ("OMPI_COMM_WORLD_SIZE", 16)


@pytest.mark.subprocess
def test_a_scheduled_job_of_several_processes_is_not_run_as_independent_copies(data_dir, tmp_path):
    """The gpu preset (one process) started twice by SLURM, with no coordinator."""
    flags = ["--config=configs/demo.py", *th.tiny_flags(data_dir)]
    env = {"SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "7"}
    proc = th.launch_train(tmp_path, flags, env=env)
    assert proc.wait(timeout=HUNG_AFTER_S) == 2
    message = proc.stderr.read()
    assert "SLURM_STEP_NUM_TASKS=2: the scheduler started 2 processes" in message
    assert "--config.num_processes=2" in message and "--coordinator_address" in message
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.subprocess
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_with_one_checkpoint(
    data_dir, tmp_path
):
    """JAX's preemption service agrees on the step; the run saves it and exits cleanly."""
    steps = 200  # milliseconds each: long enough for the signal to land mid-run
    pair = launch_pair(tmp_path, data_dir, steps=steps, checkpoint_every=1000)
    deadline = time.monotonic() + HUNG_AFTER_S
    while max(th.losses(tmp_path), default=0) < 3:
        assert time.monotonic() < deadline and all(p.poll() is None for p in pair)
        time.sleep(0.2)
    pair[1].send_signal(signal.SIGTERM)
    logs = [p.communicate(timeout=HUNG_AFTER_S)[1] for p in pair]
    assert [p.returncode for p in pair] == [0, 0], [log[-2000:] for log in logs]
    stops = [int(re.search(r"stopped at step (\d+) of", log).group(1)) for log in logs]
    assert stops[0] == stops[1] < steps
    assert checkpoints.Checkpoints(tmp_path).all_steps() == [stops[0]]
    assert max(th.losses(tmp_path)) == stops[0]
    restored = restore_on_one_device(tmp_path, stops[0], data_dir)
    assert int(restored.step) == stops[0]


@pytest.mark.subprocess
def test_processes_with_workdirs_of_their_own_refuse_to_start(data_dir, tmp_path):
    """Each host's workdir on its own disk, both empty (fresh VMs after a preemption:
    neither sees the checkpoints): refused before step 1, not trained from step 0."""
    own_disks = [tmp_path / "host0", tmp_path / "host1"]
    address = f"127.0.0.1:{free_port()}"
    flags = [
        "--config=configs/demo.py",
        *th.tiny_flags(data_dir, num_processes=2, num_train_steps=6),
        f"--coordinator_address={address}",
        "--num_processes=2",
    ]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    pair = [
        th.launch_train(workdir, [*flags, f"--process_id={i}"], env=env)
        for i, workdir in enumerate(own_disks)
    ]
    logs = [p.communicate(timeout=HUNG_AFTER_S)[1] for p in pair]
    assert [p.returncode for p in pair] == [2, 2], [log[-2000:] for log in logs]
    assert all("processes [1] do not see the token process 0 wrote" in log for log in logs)
    assert all("gs://" in log for log in logs)
    for disk in own_disks:
        assert not (disk / "metrics.jsonl").exists() and not (disk / "checkpoints").exists()
