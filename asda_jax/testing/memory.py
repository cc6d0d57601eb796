"""A launch/ script run in a fresh process with its peak resident memory measured: what
the streaming and long-recording tests bound and benchmarks/longform.py reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Runs a launch/ script (argv[1:]) and reports its peak resident memory: over the whole
# process (peak_rss_mib) and how far it grew once it began reading its first audio file
# (reading_growth_mib: sampled every 10 ms from audio.read_blocks' first call), which
# leaves out what imports and start-up take.
_MEASURED = """
import resource, runpy, sys, threading, time
from asda_jax import audio

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

state = {"base": None, "peak": 0.0}

def sample():
    while True:
        if state["base"] is not None:
            state["peak"] = max(state["peak"], rss_mib())
        time.sleep(0.01)

threading.Thread(target=sample, daemon=True).start()
read_blocks = audio.read_blocks

def measured_read_blocks(*args, **kwargs):
    if state["base"] is None:
        state["base"] = state["peak"] = rss_mib()
    return read_blocks(*args, **kwargs)

audio.read_blocks = measured_read_blocks
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    growth = state["peak"] - (state["base"] or 0.0)
    print(f"peak_rss_mib {peak:.0f} reading_growth_mib {growth:.0f}", file=sys.stderr)
"""


def run_measured(
    script: str | Path, *args: str, cwd: str | Path | None = None
) -> tuple[subprocess.CompletedProcess, dict]:
    """``script`` (a path, from ``cwd``) in a fresh process, and its
    {"peak_rss_mib", "reading_growth_mib"}."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    line = [x for x in done.stderr.splitlines() if x.startswith("peak_rss_mib")][-1].split()
    return done, {line[0]: float(line[1]), line[2]: float(line[3])}
