"""Exports a run's parameters with its model config: for fine-tuning, extract and infer,
or for the PyTorch side.

    python launch/export.py --workdir=/ckpt/as2m --output=exports/as2m [--step=N]
    python launch/export.py --workdir=exports/eat-ft --output=hf/eat-ft --format=hf
    python launch/export.py --workdir=/ckpt/as2m --output=asda_as2m.pt --format=fairseq

``--workdir`` is a training run's workdir or an export. ``orbax`` (the default): a
pretraining run exports {encoder (the student), decoder, teacher}; a fine-tuning run
{encoder, fc_norm, head} with its input length, normalisation and score function, as a
plain Orbax tree plus ``model.json`` that restores onto any mesh or device count
(finetune.init_from, launch/extract.py, launch/infer.py). ``hf``: a plain-attention
(EAT-architecture) model as a Hugging Face folder of EAT's layout, config.json +
model.safetensors (the student's encoder, and the head of a classifier). ``fairseq``:
the release's ``.pt`` (the dict the authors' feature_extract.py and inference.py read),
written with nothing pickled but tensors and plain containers (needs PyTorch); its
``cfg`` names the architecture, or is copied from a release checkpoint with
``--fairseq_cfg_from`` (fairseq rebuilds the model from that whole config).
docs/weights.md says what each holds.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys

from absl import app, flags

from asda_jax import checkpoints, cli, hf_weights, inference, storage

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's workdir, or an export.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("output", None, "A new (or empty) directory; a new .pt for fairseq.")
flags.DEFINE_enum("format", "orbax", ["orbax", "hf", "fairseq"], "What to write.")
flags.DEFINE_string(
    "fairseq_cfg_from", None, "A release .pt of the same architecture whose cfg to copy."
)
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
        **({"labels": described.input.labels} if described.input.labels else {}),
    )  # fmt: skip
    return params, described.model, description


def write(output: str, params: dict, cfg, description: dict):
    """Writes ``params`` to ``output`` in FLAGS.format; the path written."""
    if FLAGS.format == "orbax":
        return checkpoints.export(output, params, cfg, **description)
    if FLAGS.format == "hf":
        kept = {k: v for k, v in params.items() if k in ("encoder", "fc_norm", "head")}
        return hf_weights.export_model(output, kept, cfg, description["target_frames"])
    from asda_jax import torch_import

    release_cfg = None
    if FLAGS.fairseq_cfg_from:
        release_cfg = torch_import.load_checkpoint(FLAGS.fairseq_cfg_from).get("cfg")
    return torch_import.write_release_checkpoint(output, params, cfg, release_cfg)


def main(argv):
    del argv
    cli.quiet_library_logs()
    try:
        params, cfg, description = run_export(FLAGS.workdir, FLAGS.step)
        out = write(FLAGS.output, params, cfg, description)
    except (ValueError, FileExistsError, storage.MissingBucket) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}: {sorted(params)} from {description['source']}")


if __name__ == "__main__":
    app.run(main)
