"""Utterance and frame embeddings of an audio file or of every audio file in a folder.

    python launch/extract.py --checkpoint=<workdir or exported encoder> --audio=clip.wav \
        --output=embeddings/

For each file, ``<name>.utterance.npy`` (D,: the CLS output) and ``<name>.frames.npy``
(N, D: the patch outputs of the last block, time-major, N = 8 per 16 frames) are written
under --output, mirroring a folder's layout. The whole file is encoded (up to 122.88 s).
Unreadable files are reported and skipped; the exit code is 1 only if none succeeded.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from asda_jax import audio, checkpoints, cli, inference

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A training workdir or an exported encoder.")
flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest).")
flags.DEFINE_string("audio", None, "An audio file or a folder of them.")
flags.DEFINE_string("output", None, "Folder for the .npy files.")
flags.DEFINE_float("norm_mean", audio.NORM_STATS["audioset"][0], "Fbank normalisation mean.")
flags.DEFINE_float("norm_std", audio.NORM_STATS["audioset"][1], "Fbank normalisation std.")
flags.mark_flags_as_required(["checkpoint", "audio", "output"])


def main(argv):
    del argv
    cli.quiet_library_logs()
    try:
        encode, cfg, _ = inference.load_encoder(FLAGS.checkpoint, FLAGS.step)
        files, root = cli.audio_inputs(FLAGS.audio)
    except (checkpoints.CheckpointMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    output = Path(FLAGS.output)
    norm = (FLAGS.norm_mean, FLAGS.norm_std)

    def extract(path: Path) -> str:
        spec = inference.whole_clip(path, norm, cfg)
        stem = output / path.relative_to(root).with_suffix("")
        stem.parent.mkdir(parents=True, exist_ok=True)
        for name, array in inference.embed(encode, spec).items():
            np.save(f"{stem}.{name}.npy", array)
        return f"{stem}.{{utterance,frames}}.npy  frames {spec.shape[0]}"

    sys.exit(cli.run_over_files(files, extract))


if __name__ == "__main__":
    app.run(main)
