"""Transparent huge pages for XLA's CPU temporaries (glibc's ``malloc.hugetlb`` tunable).

XLA's CPU runtime allocates an executable's temporaries afresh on every call, and
glibc serves multi-MiB blocks with mmap: the base model's pretraining step maps and
faults in ~3.7 GiB of 4 KiB pages per step (~950 k page faults), a fifth of its time
on this machine. With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc ≥ 2.35) malloc
asks the kernel for transparent huge pages on those blocks and the faults drop to ~2 k
(BENCHMARKS.md). glibc reads tunables only when a process starts, so
``launch/train.py`` (and ``benchmarks/train_step.py``) re-execute themselves once with
the tunable set, before anything heavy is imported.
Set ``ASDA_JAX_DEFAULT_MALLOC=1`` to keep the system's malloc settings.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "ASDA_JAX_DEFAULT_MALLOC"


def glibc_supports_hugetlb() -> bool:
    """Whether this process runs on glibc 2.35 or newer (the tunable's first release)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return False  # not glibc (macOS, musl, Windows)
    major, minor = (int(part) for part in version.split(".")[:2])
    return name == "glibc" and (major, minor) >= (2, 35)


def with_hugetlb(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None where nothing is to be done (already
    set, opted out, or not glibc ≥ 2.35)."""
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current or environ.get(OPT_OUT) or not glibc_supports_hugetlb():
        return None
    return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE}


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command with the tunable set (same PID, same
    stdio); returns at once where ``with_hugetlb`` says there is nothing to do."""
    environ = with_hugetlb(dict(os.environ))
    if environ is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
