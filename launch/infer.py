"""Top-k labels of audio files from a fine-tuned checkpoint (a workdir or an export).

    python launch/infer.py --checkpoint=/ckpt/as20k --audio=clip.wav \
        [--labels=class_labels_indices.csv] [--top_k=5]

Display names come from --labels (AudioSet's ``index,mid,display_name`` CSV, or
``index,name``), else from the run's prepared dataset. Each file is cropped or padded
to the run's training length, as the release's inference does. Unreadable files are
reported and skipped; the exit code is 1 only if none succeeded.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys

from absl import app, flags

from asda_jax import audio, checkpoints, cli, inference
from asda_jax.data import datasets

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A fine-tuning run's workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("audio", None, "An audio file or a folder of them.")
flags.DEFINE_string("labels", None, "Label CSV with display names.")
flags.DEFINE_integer("top_k", 5, "Labels shown per file.")
flags.mark_flags_as_required(["checkpoint", "audio"])


def class_names(inputs: inference.ClassifierInput) -> list[str]:
    if FLAGS.labels:
        names = inference.read_label_names(FLAGS.labels)
    elif inputs.dataset is not None:
        names = datasets.load(inputs.dataset, inputs.data_dir).class_names
    else:
        raise ValueError("this checkpoint does not name its classes: pass --labels")
    if len(names) != inputs.num_classes:
        raise ValueError(f"{len(names)} label names for a head of {inputs.num_classes} classes")
    return names


def main(argv):
    del argv
    cli.quiet_library_logs()
    try:
        classify, data = inference.load_classifier(FLAGS.checkpoint, FLAGS.step)
        names = class_names(data)
        files, _ = cli.audio_inputs(FLAGS.audio)
    except (checkpoints.CheckpointMismatch, datasets.DatasetNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    def label(path) -> str:
        wave = audio.read_audio(path)
        spec, _ = audio.spectrogram(wave, data.target_frames, data.norm)
        scores = classify(spec[None])[0]
        return "  ".join(f"{n} {s:.3f}" for n, s in inference.top_k(scores, names, FLAGS.top_k))

    sys.exit(cli.run_over_files(files, label))


if __name__ == "__main__":
    app.run(main)
