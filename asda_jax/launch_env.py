"""The process settings the launchers re-execute themselves with, once, at start, where
the run's computation is on the host's CPU (no accelerator on the host, or
``JAX_PLATFORMS=cpu``): both were measured on CPU runs only (docs/decisions.md).

Both are read only when a process (or its library) starts, hence the re-execution:

- glibc's ``malloc.hugetlb`` tunable (glibc ≥ 2.35). XLA's CPU runtime allocates an
  executable's temporaries afresh on every call, and glibc serves multi-MiB blocks with
  mmap, so every step faults in its temporaries page by page. With
  ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` malloc asks the kernel for transparent huge
  pages on those blocks, and most of the faults go. Set ``ASDA_JAX_DEFAULT_MALLOC=1`` to
  keep the system's malloc settings.
- ``OPENBLAS_NUM_THREADS=1`` (NumPy's BLAS), unless already set. The input pipeline
  already spreads clips over its worker threads; OpenBLAS threads inside each clip's
  small mel-bank product only oversubscribe the cores, and after each call they spin
  for a while on the cores XLA's step runs on.

``benchmarks/train_step.py`` re-executes the same way, to time what the launcher runs.
"""

from __future__ import annotations

import glob
import os
import sys

HUGETLB = "glibc.malloc.hugetlb=1"
MALLOC_OPT_OUT = "ASDA_JAX_DEFAULT_MALLOC"
BLAS_THREADS = "OPENBLAS_NUM_THREADS"
# Device nodes of accelerators: TPUs (accel or vfio, by generation), NVIDIA and AMD GPUs.
ACCELERATOR_NODES = ("accel[0-9]*", "vfio/[0-9]*", "nvidia[0-9]*", "kfd")


def computes_on_cpu(environ: dict[str, str], dev: str = "/dev") -> bool:
    """Whether a process started with ``environ`` on this host runs JAX on its CPU: JAX
    is told so (``JAX_PLATFORMS=cpu``), or the host has no accelerator device."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(os.path.join(dev, node)) for node in ACCELERATOR_NODES)


def glibc_supports_hugetlb() -> bool:
    """Whether this process runs on glibc 2.35 or newer (the tunable's first release)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return False  # not glibc (macOS, musl, Windows)
    major, minor = (int(part) for part in version.split(".")[:2])
    return name == "glibc" and (major, minor) >= (2, 35)


def with_hugetlb(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with the huge-page tunable added, where it is missing, wanted and
    supported; otherwise ``environ`` unchanged."""
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current or environ.get(MALLOC_OPT_OUT):
        return environ
    if not glibc_supports_hugetlb():
        return environ
    return {**environ, "GLIBC_TUNABLES": f"{current}:{HUGETLB}" if current else HUGETLB}


def with_one_blas_thread(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with OpenBLAS held to one thread, unless the user chose a count."""
    return environ if BLAS_THREADS in environ else {**environ, BLAS_THREADS: "1"}


def launcher_environment(environ: dict[str, str], dev: str = "/dev") -> dict[str, str] | None:
    """The environment to re-execute with, or None where ``environ`` already is it or
    the run is on an accelerator."""
    if not computes_on_cpu(environ, dev):
        return None
    wanted = with_one_blas_thread(with_hugetlb(environ))
    return None if wanted == environ else wanted


def reexec_with_launcher_environment() -> None:
    """Replaces this process by the same command in ``launcher_environment`` (same PID,
    same stdio); returns at once where there is nothing to change."""
    environ = launcher_environment(dict(os.environ))
    if environ is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
