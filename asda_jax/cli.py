"""Helpers for the command-line scripts under launch/."""

from __future__ import annotations

import logging
import os
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
from absl import flags
from absl import logging as absl_logging
from etils import epath

from asda_jax import audio, config_lib, progress, storage
from asda_jax.data import builders

NOISY_LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/etils/", "/grain/")
# Where schedulers say how many processes they started for this job step: SLURM's srun,
# Open MPI's mpirun, MPICH and Intel MPI (PMI). Not SLURM_NTASKS: that is the
# allocation's count, which the one process of an `sbatch --ntasks=8` script sees too.
SCHEDULER_PROCESS_COUNTS = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class _QuietLibraries(logging.Filter):
    """Drops INFO records of chatty libraries; their warnings and errors still pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(
            part in record.pathname for part in NOISY_LIBRARIES
        )


def scheduled_processes(environ: Mapping[str, str]) -> tuple[str, int] | None:
    """(variable, count) where a scheduler says it started several processes for this
    job; None for a job of one process."""
    for name in SCHEDULER_PROCESS_COUNTS:
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 1:
            return name, int(value)
    return None


def define_cluster_flags() -> None:
    """The flags of the launchers that train (``join_processes``), for a cluster that
    does not describe itself."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")


def join_processes(config) -> None:
    """The start-up of every launcher that trains, before any device is touched: joins
    a multi-host run (``config.num_processes`` > 1, or the ``define_cluster_flags``
    flags); a single-process run stays as it is, unless a scheduler started several of
    it (each would train alone into the same workdir). Raises ConfigError."""
    address = flags.FLAGS.coordinator_address
    expected = config.get("num_processes") or 1
    scheduled = scheduled_processes(os.environ)
    if scheduled and expected == 1 and not address:
        name, count = scheduled
        raise config_lib.ConfigError(
            f"{name}={count}: the scheduler started {count} processes, but the config "
            f"expects 1 and no --coordinator_address was given, so each would train alone "
            f"into the same workdir. Pass --config.num_processes={count} (JAX then joins "
            "them), or --coordinator_address, --num_processes and --process_id; for one "
            f"process of a larger allocation, run it with {name}=1"
        )
    if address:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=flags.FLAGS.num_processes,
            process_id=flags.FLAGS.process_id,
        )
    elif expected > 1:
        try:
            jax.distributed.initialize()  # TPU pods and SLURM clusters describe themselves
        except ValueError as e:
            raise config_lib.ConfigError(
                f"config expects {expected} processes, but no multi-host environment was "
                f"detected ({e}); pass --coordinator_address, --num_processes and "
                "--process_id, or set --config.num_processes=1"
            ) from e


def start() -> None:
    """What every launcher does first, before ``app.run`` parses its flags: chatty
    libraries' INFO logs dropped, and ``gs://`` paths served as ``storage.configure``
    says (which must precede the process's first path operation)."""
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())
    storage.configure()


def audio_inputs(path: str | os.PathLike) -> tuple[list[epath.Path], epath.Path]:
    """(audio files, the folder their output paths are relative to) of a file or folder,
    local or remote (``gs://``)."""
    path = storage.path(path)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = builders.audio_files(path)
        if not files:
            raise FileNotFoundError(f"no files under {path}")
        return files, path
    raise FileNotFoundError(f"{path}: no such file or folder")


def run_over_files(files: list[epath.Path], work: Callable[[epath.Path], str], what: str) -> int:
    """Runs ``work`` on each file, printing its line, with the progress of ``what``
    (e.g. "extract") over several; unusable audio is reported and skipped. Returns the
    exit code: 0 if any file succeeded, else 1."""
    skipped = []
    shown = progress.progress(files, what) if len(files) > 1 else files
    for path in shown:
        try:
            progress.write(f"{path}: {work(path)}", sys.stdout)
        except audio.AudioError as e:
            skipped.append(path)
            progress.write(f"skipped {path}: {e}", sys.stderr)
    done = len(files) - len(skipped)
    print(f"{done} of {len(files)} files done, {len(skipped)} skipped", flush=True)
    return 0 if done else 1


class NpyRows:
    """A float32 ``.npy`` file of (rows, width) written as rows arrive, so an output of
    any length never sits in memory whole. It appears under its name only when closed
    after success; on an error the partial file is removed."""

    HEADER_BYTES = 128  # magic, version, length and the padded dict: NumPy's format 1.0

    def __init__(self, path: str | Path, width: int):
        self.path, self.width, self.rows = Path(path), width, 0
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.file = None

    def _header(self) -> bytes:
        text = repr({"descr": "<f4", "fortran_order": False, "shape": (self.rows, self.width)})
        text = text.ljust(self.HEADER_BYTES - 11) + "\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")

    def append(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, "<f4").reshape(-1, self.width)
        self.file.write(rows.tobytes())
        self.rows += rows.shape[0]

    def __enter__(self) -> NpyRows:
        self.file = self.partial.open("wb")
        self.file.write(self._header())
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self.file.close()
            self.partial.unlink(missing_ok=True)
            return
        self.file.seek(0)
        self.file.write(self._header())
        self.file.close()
        os.replace(self.partial, self.path)
