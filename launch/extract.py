"""Embeddings of audio files of any length: per file, per window and per 160 ms step.

    python launch/extract.py --checkpoint=<workdir or exported encoder> --audio=clip.wav \
        --output=embeddings/ [--window=2.56] [--hop=5.12] [--frames=concat|mean]

Each file is cut into windows of the encoder's training length (or ``--window``
seconds, shorter, in whole 0.16 s time patches; ``--hop`` seconds apart, a multiple of
0.16 s; default: the window), read in blocks and encoded in batches with padding masks
(asda_jax/embeddings.py): what ``launch/stream.py`` computes as audio arrives.
Written under --output, mirroring a folder's layout, per file:

  <name>.utterance.npy       (D,)     the windows' CLS outputs averaged, each weighted
                                      by its real frames (one window: its CLS output)
  <name>.frames.npy          (S, D')  one row per 16-frame time step: its frequency
                                      patches side by side (--frames=concat, D' = 8·D
                                      at 128 mel bins: the patch outputs as the encoder
                                      lays them out) or averaged (mean, D' = D);
                                      overlapping windows averaged; written as it goes
  <name>.frame_times_ms.npy  (S,)     each step's centre
  <name>.windows.npy         (W, D)   each window's CLS output
  <name>.window_spans.npy    (W, 2)   each window's start and end in seconds

Unreadable files are reported and skipped; the exit code is 1 only if none succeeded.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from asda_jax import launch_env

launch_env.reexec_with_launcher_environment()  # as launch/train.py: asda_jax/launch_env.py

import sys

import numpy as np
from absl import app, flags
from etils import epath

from asda_jax import checkpoints, cli, embeddings, inference, storage, windows

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A training workdir or an exported encoder.")
flags.DEFINE_integer("step", None, "Checkpoint step of a workdir (default: the latest).")
flags.DEFINE_string("audio", None, "An audio file or a folder of them.")
flags.DEFINE_string("output", None, "Folder for the .npy files.")
flags.DEFINE_float("window", None, "Window seconds, at most the model's input (default).")
flags.DEFINE_float("hop", None, "Seconds between window starts (default: the window).")
flags.DEFINE_enum("frames", "concat", embeddings.POOLINGS, "A time step's frequency patches.")
flags.DEFINE_integer("batch_size", None, "Windows per call (default: the chip's).")
flags.DEFINE_float("norm_mean", None, "Fbank normalisation mean (default: the model's).")
flags.DEFINE_float("norm_std", None, "Fbank normalisation std (default: the model's).")
flags.mark_flags_as_required(["checkpoint", "audio", "output"])


def norm_override() -> tuple[float, float] | None:
    """--norm_mean/--norm_std, given together, else None (the model's own)."""
    given = (FLAGS.norm_mean, FLAGS.norm_std)
    if given.count(None) == 1:
        raise ValueError("pass both --norm_mean and --norm_std, or neither")
    return None if None in given else given


def window_frames(encoder: inference.LoadedEncoder) -> int | None:
    """--window as whole time patches; None: the encoder's input."""
    if FLAGS.window is None:
        return None
    return windows.window_frames(FLAGS.window, encoder.cfg.patch_size, encoder.input.target_frames)


def main(argv):
    del argv
    try:
        encoder = inference.load_encoder(FLAGS.checkpoint, FLAGS.step)
        embedder = embeddings.Embedder(
            encoder,
            norm_override(),
            window_frames=window_frames(encoder),
            hop_frames=None if FLAGS.hop is None else windows.hop_frames(FLAGS.hop),
            batch_size=FLAGS.batch_size,
        )
        files, root = cli.audio_inputs(FLAGS.audio)
        output = storage.Stage(FLAGS.output)  # a bucket's outputs are written here first
    except (checkpoints.CheckpointMismatch, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    def extract(path: epath.Path) -> str:
        name = path.relative_to(root).with_suffix("")
        stem = output.local / name
        stem.parent.mkdir(parents=True, exist_ok=True)
        width = embedder.step_dim(FLAGS.frames)
        with cli.NpyRows(f"{stem}.frames.npy", width) as frames:
            out = embeddings.assemble(embedder, embedder.of_file(path), FLAGS.frames, frames.append)
        np.save(f"{stem}.utterance.npy", out.utterance)
        np.save(f"{stem}.frame_times_ms.npy", out.times_ms)
        np.save(f"{stem}.windows.npy", out.windows)
        np.save(f"{stem}.window_spans.npy", out.spans)
        output.sync()
        return f"{output.target / name}.*.npy  {len(out.windows)} windows, {frames.rows} steps"

    code = cli.run_over_files(files, extract, "extract")
    output.close()
    sys.exit(code)


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
