"""Draws a run's report: <workdir>/report/ with PNGs and report.md, the page that shows
them.

    python launch/report.py --workdir=workdirs/demo

Any run (pretraining too): its curves from metrics.jsonl (losses, learning rate,
gradient norm, clips/s, validation metrics). A classifier whose final evaluation left
predictions.csv (the final evaluation of launch/train.py writes it): per-class precision,
recall and F1 (single-label) or average precision (multi-label), per_class.csv, and
single-label, the confusion matrix. launch/train.py draws it at the end of a
fine-tuning run by itself; this redraws it for any run, local or gs://.

Exit codes: 0 drawn, 2 not a run's workdir.
"""

from __future__ import annotations

import sys

from absl import app, flags

from asda_jax import cli, report

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run's workdir (a folder or a gs:// URL).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    try:
        page = report.write(FLAGS.workdir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {page}")


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
