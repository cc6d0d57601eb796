"""Converts an authors' PyTorch checkpoint (ASDA or EAT layout) into an export of ours.

    python launch/convert_torch.py --checkpoint=ASDA_pretrain.pt --output=exports/asda-as2m
    python launch/convert_torch.py --checkpoint=ASDA_finetuned_as2m.pt --output=exports/asda-ft

The file is read without executing any pickled code (asda_jax/torch_import.py); a file
that names code is refused. Prints a report of missing and unexpected keys, shape
mismatches and the positional table's distance from ours, then writes
``<output>/model.json`` + ``<output>/params/`` ({encoder, decoder, teacher} for a
pretraining checkpoint, {encoder, fc_norm, head} for a fine-tuned one), which
fine-tuning (finetune.init_from), extract and infer load. Needs PyTorch (only here).

Exit codes: 0 written, 2 unreadable/refused/mismatched (nothing written).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from asda_jax import audio, checkpoints, release_weights, torch_import

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "The release .pt file.")
flags.DEFINE_string("output", None, "A new (or empty) directory for the export.")
flags.DEFINE_integer("num_heads", None, "Attention heads (default: embed_dim / 64).")
flags.DEFINE_integer("target_frames", 1024, "Input frames the model was trained on.")
flags.DEFINE_enum("norm", "audioset", list(audio.NORM_STATS), "Fbank normalisation stats.")
flags.mark_flags_as_required(["checkpoint", "output"])


def convert(path: str):
    """(params, ModelConfig, report) of a release checkpoint; raises on any mismatch."""
    release = torch_import.split_state(torch_import.load_checkpoint(path))
    cfg = torch_import.infer_config(release.student, FLAGS.num_heads)
    report = torch_import.key_report(release, cfg)
    problems = {k: v for k, v in report.items() if v and not k.startswith("unexpected")}
    if problems:
        raise checkpoints.CheckpointMismatch(f"does not fit {cfg}: {problems}")
    report = {"kind": release.kind, **report}
    params = torch_import.convert(release, cfg)
    torch_import.check_shapes(params, cfg)
    if release_weights.POSITIONS in release.student:
        distance = release_weights.positions_max_difference(release.student, cfg)
        report["positions_max_difference"] = distance
    return params, cfg, report


def main(argv):
    del argv
    try:
        params, cfg, report = convert(FLAGS.checkpoint)
    except (checkpoints.CheckpointMismatch, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report, indent=2))
    description = dict(
        source=FLAGS.checkpoint, kind=report["kind"], target_frames=FLAGS.target_frames,
        norm=audio.NORM_STATS[FLAGS.norm],
    )  # fmt: skip
    if report["kind"] == "finetuned":
        description |= dict(pooling="cls", scores="sigmoid")
    try:
        out = checkpoints.export(FLAGS.output, params, cfg, **description)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}: {sorted(params)}")


if __name__ == "__main__":
    app.run(main)
