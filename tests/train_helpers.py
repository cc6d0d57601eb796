"""A tiny pretraining run, the same in-process and on the command line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from asda_jax import config_lib, hardware, storage, train_lib

ROOT = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = {
    "model.preset": "tiny",
    "mask.clone_batch": 2,
    "mask.mask_length": 2,
    "pretrain.average_top_k_layers": 2,
    "pretrain.collapse_check_after": 1000,
    "data.batch_size": 8,
    "data.target_frames": 64,
    "data.threads": 1,
    "num_train_steps": 8,
    "optim.warmup_steps": 2,
    "log_every": 1,
    "checkpoint_every": 2,
}


def load_config(path: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location("config_module", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def override(config, overrides: dict):
    """Sets ``{"block.field": value}`` entries, as --config.block.field=value would."""
    for key, value in overrides.items():
        block, _, field = key.rpartition(".")
        target = config[block] if block else config
        target[field] = value
    return config


def tiny_config(data_dir: str, **extra):
    """configs/demo.py with tiny sizes, reading ``data_dir``."""
    overrides = {**TINY_OVERRIDES, "data.data_dir": data_dir, **extra}
    return override(load_config("configs/demo.py"), overrides)


def task_on_cpu(config):
    """The task of ``config`` read for this host's CPU."""
    return train_lib.make_task(config_lib.read(config, hardware.HOST))


def tiny_flags(data_dir: str, **extra) -> list[str]:
    """The same overrides as command-line flags for launch/train.py."""
    overrides = {**TINY_OVERRIDES, "data.data_dir": data_dir, **extra}
    return [f"--config.{key}={value}" for key, value in overrides.items()]


def launch_train(workdir, args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "launch" / "train.py"), f"--workdir={workdir}", *args]
    return subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def losses(workdir) -> dict[int, list[float]]:
    """Every loss metrics.jsonl recorded, by step (a list: a step recorded twice would
    show as two)."""
    recorded: dict[int, list[float]] = {}
    path = storage.path(workdir) / "metrics.jsonl"
    if not path.exists():
        return recorded
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        recorded.setdefault(entry["step"], []).append(entry["loss"])
    return recorded


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


def run_measured(script: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """launch/<script>.py in a fresh process, and {"peak_rss_mib", "reading_growth_mib"}."""
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, f"launch/{script}.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    line = [x for x in done.stderr.splitlines() if x.startswith("peak_rss_mib")][-1].split()
    return done, {line[0]: float(line[1]), line[2]: float(line[3])}
