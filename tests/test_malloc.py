"""The launch scripts' re-execution with glibc's huge-page malloc tunable."""

import os
import subprocess
import sys

import pytest

from asda_jax import malloc

needs_glibc = pytest.mark.skipif(not malloc.glibc_supports_hugetlb(), reason="needs glibc >= 2.35")


@needs_glibc
def test_the_tunable_is_added_once_and_kept_with_others():
    assert malloc.with_hugetlb({"HOME": "/h"}) == {
        "HOME": "/h",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    }
    assert malloc.with_hugetlb({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    }
    assert malloc.with_hugetlb({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # user's
    assert malloc.with_hugetlb({malloc.OPT_OUT: "1"}) is None


@needs_glibc
def test_reexec_keeps_the_process_and_its_arguments():
    code = (
        "import os, sys; from asda_jax import malloc; print(os.getpid(), sys.argv[1:]);"
        " malloc.reexec_with_huge_pages(); print(os.environ['GLIBC_TUNABLES'])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", malloc.OPT_OUT)}
    out = subprocess.run(
        [sys.executable, "-c", code, "--flag=1"], env=env, capture_output=True, text=True
    )
    first, second, tunables = out.stdout.splitlines()
    assert first == second and first.endswith("['--flag=1']")  # same PID, same argv
    assert tunables == "glibc.malloc.hugetlb=1"
    opted_out = subprocess.run(
        [sys.executable, "-c", code], env={**env, malloc.OPT_OUT: "1"}, capture_output=True
    )
    assert opted_out.returncode == 1  # no re-exec, so no GLIBC_TUNABLES: KeyError
