"""Prepares a dataset from files you already have (nothing is downloaded).

    python launch/prepare_data.py --dataset=synthetic --data_dir=data
    python launch/prepare_data.py --dataset=esc50 --source=/data/ESC-50-master --data_dir=data
    python launch/prepare_data.py --dataset=audioset --source=/data/audioset --data_dir=data
    python launch/prepare_data.py --dataset=speech_commands_v2 --source=/data/sc_v2 --data_dir=data
    python launch/prepare_data.py --dataset=audio_folder --source=/data/my_sounds --data_dir=data
    python launch/prepare_data.py --dataset=unlabelled_folder --source=/data/field --data_dir=data

Each dataset's expected source layout is printed when --source does not match it. For
``unlabelled_folder`` --max_seconds is the segment length (default 10.255 s: one
1024-frame input).
"""

from __future__ import annotations

import sys

from absl import app, flags

from asda_jax import cli, storage
from asda_jax.data import builders, datasets

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", None, sorted(datasets.BUILDERS), "Dataset to prepare.")
flags.DEFINE_string("source", None, "Local source tree (not needed for synthetic).")
flags.DEFINE_string("data_dir", "data", "Where prepared datasets live: a folder or a gs:// URL.")
flags.DEFINE_float("max_seconds", None, "Longest audio kept per clip (default per dataset).")
flags.DEFINE_integer("workers", None, "Clips converted at once (default: one per core).")
flags.DEFINE_enum(
    "pool",
    "auto",
    builders.POOLS,
    f"auto: processes for {builders.PROCESS_POOL_MIN_CLIPS}+ files and 3+ workers, else threads.",
)
flags.DEFINE_integer("clips_per_class", 300, "synthetic only: clips per class.")
flags.mark_flag_as_required("dataset")


def main(argv):
    del argv
    options = {"max_seconds": FLAGS.max_seconds, "workers": FLAGS.workers, "pool": FLAGS.pool}
    if FLAGS.dataset == "synthetic":
        options["clips_per_class"] = FLAGS.clips_per_class
    try:
        dataset = datasets.prepare(
            FLAGS.dataset, FLAGS.data_dir, source_dir=FLAGS.source, **options
        )
    except (builders.DatasetLayoutError, ValueError, storage.MissingBucket) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{dataset.name}: {dataset.directory}")
    print(f"  classes: {dataset.num_classes}")
    for split, size in dataset.split_sizes.items():
        skipped = dataset.skipped.get(split) or {}
        print(f"  {split}: {size} clips" + (f", skipped {skipped}" if skipped else ""))


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
