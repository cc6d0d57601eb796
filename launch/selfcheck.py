"""Checks the kernels a run will use against their XLA forms, on the devices here.

    python launch/selfcheck.py --config=configs/pretrain_as2m.py:mesh=v5e-8
    python launch/selfcheck.py --config=configs/demo.py --json=selfcheck.json

Reads the config for the chip of the devices present (as launch/train.py does) and
calls each kernel it would use (Pallas attention, MLP and decoder kernels on a TPU,
cuDNN attention on a GPU) at the run's shapes (one device's examples of each encoder
pass and of the decoder) and compute dtype, next to its XLA form: forward outputs and
gradients within the bounds stated for the dtype (asda_jax/selfcheck.py), and both
timed. launch/train.py runs the same check first on TPUs and GPUs
(--config.selfcheck=off to skip it) and uses the XLA form of any kernel that
disagrees. Nothing is read from disk but the config.

Exit codes: 0 every kernel agrees (or the run uses none), 1 a kernel disagrees,
2 bad config.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import sys
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from asda_jax import cli, config_lib, hardware, selfcheck, sharding

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).")
flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    chip = hardware.of_devices(jax.devices())
    try:
        run = config_lib.validate(
            FLAGS.config, chip=chip, device_count=jax.device_count(),
            process_count=jax.process_count(), require_files=False,
        )  # fmt: skip
        mesh = sharding.make_mesh(run.mesh, dcn_shape=run.mesh_dcn)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checks = selfcheck.check_run(run, mesh)
    print(f"{chip.description}, {jax.device_count()} devices, jax {jax.__version__}")
    if not checks:
        print("this run uses no kernel here: every call takes its XLA form")
    else:
        print(selfcheck.table(checks))
    off = selfcheck.dropped(run, checks)
    if FLAGS.json:
        report = selfcheck.report(checks, off, chip.description)
        Path(FLAGS.json).write_text(json.dumps(report, indent=2))
    return 1 if any(not c.agrees for c in checks) else 0


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
