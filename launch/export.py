"""Exports a run's parameters with its model config, for fine-tuning, extract and infer.

    python launch/export.py --workdir=/ckpt/as2m --output=exports/as2m [--step=N]

A pretraining run exports {encoder (the student), decoder, teacher}; a fine-tuning run
{encoder, fc_norm, head} with its input length, normalisation and score function.
The export is a plain Orbax tree plus ``model.json``: it restores onto any mesh or
device count (finetune.init_from, launch/extract.py, launch/infer.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys

from absl import app, flags

from asda_jax import checkpoints, cli, inference, storage

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("output", None, "A new (or empty) directory for the export.")
flags.mark_flags_as_required(["workdir", "output"])


def run_export(workdir: str, step: int | None):
    """(params, ModelConfig, description) of a run's checkpoint."""
    described = inference.describe(workdir)
    item, prefix = checkpoints.locate_params(workdir, step)
    params = checkpoints.restore_item(item, prefix)
    if described.kind == "pretrain":
        params["teacher"] = checkpoints.restore_item(item, ("teacher",))
    description = dict(
        source=str(item.parent), kind=described.kind,
        target_frames=described.input.target_frames, norm=described.input.norm,
        **(described.head or {}),
    )  # fmt: skip
    return params, described.model, description


def main(argv):
    del argv
    cli.quiet_library_logs()
    try:
        params, cfg, description = run_export(FLAGS.workdir, FLAGS.step)
        out = checkpoints.export(FLAGS.output, params, cfg, **description)
    except (checkpoints.CheckpointMismatch, FileExistsError, storage.MissingBucket) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}: {sorted(params)} from {description['source']}")


if __name__ == "__main__":
    app.run(main)
