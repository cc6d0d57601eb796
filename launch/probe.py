"""Linear probes of encoders on your own labelled folder, one source held out at a time.

    python launch/probe.py --labels=my_sounds/ --checkpoint=workdirs/run \
        [--checkpoint=exports/other@...] [--step=N] [--random_init] [--logmel] \
        [--which=encoder|teacher] [--pooling=mean|cls] [--output=probe.json]

``--labels``: a folder with ``labels.csv`` (``path,label[,group]``; ``group`` is the
recording's source: a microphone, a speaker, a sound bank) or class folders. With
groups, each group is held out in turn; without, files are dealt into ``--folds``
folds per class. For every ``--checkpoint`` (a workdir, at its latest step or
``--step``, or an export; ``--which=teacher``: a pretraining run's EMA teacher), with
``--random_init`` the first one's architecture at random initialisation, and with
``--logmel`` log-mel statistics, prints the class-balanced accuracy per held-out
fold, the mean and the spread (asda_jax/file_probe.py). Files that are not usable
audio are skipped and counted; the exit code is 2 for a folder or checkpoint that
cannot be read.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from asda_jax import launch_env

launch_env.reexec_with_launcher_environment()  # as launch/train.py: asda_jax/launch_env.py

import json
import sys

from absl import app, flags

from asda_jax import checkpoints, cli, file_probe, inference

FLAGS = flags.FLAGS
flags.DEFINE_string("labels", None, "A labelled folder: labels.csv or class folders.")
flags.DEFINE_multi_string("checkpoint", [], "A training workdir or an exported encoder.")
flags.DEFINE_integer("step", None, "Checkpoint step of the workdirs (default: the latest).")
flags.DEFINE_enum(
    "which", "encoder", ("encoder", "teacher"), "A pretraining run's student or EMA teacher."
)
flags.DEFINE_bool("random_init", False, "Also the first checkpoint's encoder at random init.")
flags.DEFINE_bool("logmel", False, "Also log-mel statistics per band.")
flags.DEFINE_enum("pooling", "mean", file_probe.POOLINGS, "An encoder's clip embedding.")
flags.DEFINE_integer("folds", 5, "Folds per class when the folder names no groups.")
flags.DEFINE_float("max_seconds", 30.0, "Seconds read of each file.")
flags.DEFINE_string("output", None, "Write the results here as JSON.")
flags.mark_flags_as_required(["labels"])


def probed(encoders: dict, waves, files, folds) -> dict:
    """The probe's results per feature set: log-mel statistics and each encoder's."""
    results = {}
    if FLAGS.logmel:
        features = file_probe.logmel_statistics(waves)
        results["log-mel statistics"] = file_probe.run(features, files, folds)
    for name, encoder in encoders.items():
        features = file_probe.encoder_features(encoder, waves, FLAGS.pooling)
        results[name] = file_probe.run(features, files, folds)
    return results


def main(argv):
    del argv
    if not (FLAGS.checkpoint or FLAGS.logmel):
        print("error: nothing to probe: pass --checkpoint and/or --logmel", file=sys.stderr)
        sys.exit(2)
    try:
        listed = file_probe.read_labelled_folder(FLAGS.labels)
        waves, kept, skipped = file_probe.read_waves(listed, FLAGS.max_seconds)
        files = [listed[i] for i in kept]
        folds = file_probe.held_out_folds(files, FLAGS.folds)
        encoders = {
            path: inference.load_encoder(path, FLAGS.step, FLAGS.which) for path in FLAGS.checkpoint
        }
        if FLAGS.random_init:
            encoders["random init"] = inference.random_encoder(FLAGS.checkpoint[0])
    except (checkpoints.CheckpointMismatch, FileNotFoundError, ValueError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(files)} files, {len(folds)} folds; skipped {dict(skipped) or 'none'}", flush=True)
    try:
        results = probed(encoders, waves, files, folds)
    except ValueError as e:  # folds a probe cannot fit (e.g. a class only one source has)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(file_probe.table(results, [f.name for f in folds]))
    if FLAGS.output:
        report = {"files": len(files), "skipped": dict(skipped), "pooling": FLAGS.pooling}
        report["results"] = {name: r.as_dict() for name, r in results.items()}
        with open(FLAGS.output, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
