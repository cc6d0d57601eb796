"""Timing, memory and environment helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

import jax


def median_seconds(fn: Callable, *args, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn(*args)`` with its outputs ready, after warm-up calls."""
    return interleaved_medians([(fn, args)], repeats=repeats, warmup=warmup)[0]


def interleaved_medians(
    calls: Sequence[tuple[Callable, Sequence]],
    repeats: int = 10,
    warmup: int = 2,
    per_round: int = 1,
) -> list[float]:
    """Median wall time of each ``fn(*args)``, timed in alternating rounds.

    Alternating makes slow drifts of a shared machine hit every candidate alike, so
    ratios between them are steadier than from back-to-back series. With
    ``per_round > 1`` each round runs a candidate that many times and drops the first
    run: large steps (GiBs of working set) slow down right after a switch.
    """
    for fn, args in calls:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, (fn, args) in enumerate(calls):
            for run in range(per_round):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                if per_round == 1 or run > 0:
                    times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def compiled_peak_bytes(jitted: Callable, *args) -> int:
    """XLA's planned peak for one call: temporaries plus outputs (arguments excluded)."""
    analysis = jitted.lower(*args).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def versions(packages: Sequence[str] = ("jax", "jaxlib", "flax", "numpy")) -> str:
    found = []
    for name in packages:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    devices = jax.devices()
    kind = devices[0].device_kind if devices else "?"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, "
        f"jax backend {jax.default_backend()} ({len(devices)}× {kind}), "
        f"Python {platform.python_version()}"
    )


def cases_from_flag(default: str) -> list[list[str]]:
    """``--cases "a b c;d e f"`` (else ``default``) as each case's words."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=default, help="cases separated by ';'")
    return [case.split() for case in parser.parse_args().cases.split(";")]


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table, ready to paste into BENCHMARKS.md."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def compiled_report(python: str, flags: Sequence[str], path: Path) -> dict:
    """The JSON report of one ``launch/compile.py`` run with ``flags`` in its own process
    (``python``: an interpreter with the chips' compiler), kept at ``path`` and read back
    from there when it is already there (an interrupted sweep resumes); on failure
    {"error": the last lines of its stderr}."""
    if not path.exists():
        command = [python, "launch/compile.py", *flags, f"--json={path}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode not in (0, 1):  # 1: compiled, does not fit (in the report)
            return {"error": "\n".join(done.stderr.strip().splitlines()[-3:])}
    return json.loads(path.read_text())
