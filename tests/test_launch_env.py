"""The launch scripts' re-execution with the huge-page malloc and one OpenBLAS thread,
on hosts whose run computes on the CPU."""

import os
import subprocess
import sys

import pytest

from asda_jax import launch_env

needs_glibc = pytest.mark.skipif(
    not launch_env.glibc_supports_hugetlb(), reason="needs glibc >= 2.35"
)
CLEAN = {"HOME": "/h"}


@needs_glibc
def test_the_tunable_is_added_once_and_kept_with_others():
    add = launch_env.with_hugetlb
    assert add(CLEAN) == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert add({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    }
    users = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert add(users) == users
    assert add({launch_env.MALLOC_OPT_OUT: "1"}) == {launch_env.MALLOC_OPT_OUT: "1"}


def test_blas_is_held_to_one_thread_unless_the_user_chose():
    assert launch_env.with_one_blas_thread(CLEAN) == {**CLEAN, "OPENBLAS_NUM_THREADS": "1"}
    assert launch_env.with_one_blas_thread({"OPENBLAS_NUM_THREADS": "4"}) == {
        "OPENBLAS_NUM_THREADS": "4"
    }


def test_the_settings_are_for_runs_on_the_cpu_only(tmp_path):
    dev = tmp_path / "dev"
    (dev / "vfio").mkdir(parents=True)
    (dev / "vfio" / "vfio").touch()  # the control node: no device bound
    assert launch_env.computes_on_cpu({}, str(dev))
    for node in ("accel0", "nvidia0", "kfd", "vfio/0"):
        (dev / node).touch()
        assert not launch_env.computes_on_cpu({}, str(dev)), node
        assert launch_env.launcher_environment(CLEAN, str(dev)) is None  # nothing to change
        assert launch_env.computes_on_cpu({"JAX_PLATFORMS": "cpu"}, str(dev))  # told so
        (dev / node).unlink()
    assert not launch_env.computes_on_cpu({"JAX_PLATFORMS": "tpu,cpu"}, str(dev))


@needs_glibc
def test_the_launcher_environment_is_both_or_none_when_already_there(tmp_path):
    wanted = launch_env.launcher_environment(CLEAN, str(tmp_path))
    assert wanted == {
        **CLEAN,
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    assert launch_env.launcher_environment(wanted, str(tmp_path)) is None  # re-executes once
    opted_out = {**CLEAN, launch_env.MALLOC_OPT_OUT: "1", "OPENBLAS_NUM_THREADS": "2"}
    assert launch_env.launcher_environment(opted_out, str(tmp_path)) is None


@pytest.mark.subprocess
@needs_glibc
def test_reexec_keeps_the_process_and_its_arguments():
    code = (
        "import os, sys; from asda_jax import launch_env; print(os.getpid(), sys.argv[1:]);"
        " launch_env.reexec_with_launcher_environment();"
        " print(os.environ.get('GLIBC_TUNABLES'), os.environ['OPENBLAS_NUM_THREADS'])"
    )
    unset = ("GLIBC_TUNABLES", "OPENBLAS_NUM_THREADS", launch_env.MALLOC_OPT_OUT)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run(
        [sys.executable, "-c", code, "--flag=1"], env=env, capture_output=True, text=True
    )
    first, second, settings = out.stdout.splitlines()
    assert first == second and first.endswith("['--flag=1']")  # same PID, same argv
    assert settings == "glibc.malloc.hugetlb=1 1"
    opted_out = {**env, launch_env.MALLOC_OPT_OUT: "1", "OPENBLAS_NUM_THREADS": "2"}
    kept = subprocess.run(
        [sys.executable, "-c", code], env=opted_out, capture_output=True, text=True, check=True
    )
    _pid, settings = kept.stdout.splitlines()  # one start: nothing to change, no re-exec
    assert settings == "None 2"  # the user's thread count, no tunable added
