"""A tiny pretraining run, the same in-process and on the command line."""

from __future__ import annotations

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


def tiny_config(data_dir: str, **extra):
    """configs/demo.py with tiny sizes, reading ``data_dir``."""
    config = config_lib.load_file(ROOT / "configs" / "demo.py")
    config.update_from_flattened_dict({**TINY_OVERRIDES, "data.data_dir": data_dir, **extra})
    return config


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
