"""ESC-50 5-fold cross-validation: fine-tunes one model per held-out fold, reports each
fold's accuracy and their mean ± std.

    python launch/esc50_folds.py --config=configs/finetune_esc50.py:mesh=gpu,init_from=... \
        --workdir=/ckpt/esc50 [--folds=1,2,3,4,5]

Fold k trains on the other four folds in <workdir>/fold<k> (resumed if interrupted,
skipped if already finished) and is evaluated on fold k; the summary goes to
<workdir>/folds.json. Overrides (--config.x=y) apply to every fold. It starts as
launch/train.py does (the same environment, multi-host joining and scheduler checks,
the same cluster flags). A SIGTERM saves the running fold where it stopped and ends the
call (exit 0) with that fold unfinished: neither evaluated nor in a summary; the same
command resumes it.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from asda_jax import launch_env

launch_env.reexec_with_launcher_environment()  # before anything loads: asda_jax/launch_env.py

import json
import sys

import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from asda_jax import cli, config_lib, evaluation, recipes, report, storage, train_lib
from asda_jax.data import datasets

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "configs/finetune_esc50.py[:args]")
flags.DEFINE_string("workdir", None, "One sub-folder per fold goes here.")
flags.DEFINE_list("folds", [str(k) for k in range(1, recipes.ESC50_FOLDS + 1)], "Folds to run.")
cli.define_cluster_flags()
flags.mark_flags_as_required(["config", "workdir"])


def fold_accuracy(config, fold: int, workdir: epath.Path) -> float | None:
    """Fold ``fold``'s accuracy, trained (or resumed) in ``workdir`` and evaluated;
    None where a SIGTERM stopped its training early (saved, not evaluated)."""
    config = config.copy_and_resolve_references()
    train_split, eval_split = recipes.esc50_splits(fold)
    config.data.split = train_split
    config.eval_data.split = eval_split
    done = workdir / report.EVAL_FILE
    if done.exists():
        return json.loads(done.read_text())["accuracy"]
    state, task, mesh = train_lib.train(config, workdir)
    if int(state.step) != task.config.num_train_steps:
        return None
    return evaluation.final_evaluation(state, task, mesh, workdir)["accuracy"]


def main(argv):
    del argv
    root = storage.path(FLAGS.workdir)
    accuracies = {}
    try:
        cli.join_processes(FLAGS.config)
        for fold in map(int, FLAGS.folds):
            accuracy = fold_accuracy(FLAGS.config, fold, root / f"fold{fold}")
            if accuracy is None:
                print(f"fold {fold} stopped before its last step (SIGTERM); it is saved "
                      "and unfinished: run the same command again to resume it")  # fmt: skip
                return
            accuracies[f"fold{fold}"] = accuracy
            print(f"fold {fold}: accuracy {accuracy:.2%}", flush=True)
    except (config_lib.ConfigError, datasets.DatasetNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    values = np.array(list(accuracies.values()))
    summary = {"folds": accuracies, "mean": float(values.mean()), "std": float(values.std())}
    (root / "folds.json").write_text(json.dumps(summary, indent=2))
    print(f"ESC-50 accuracy over {len(values)} folds: {values.mean():.2%} ± {values.std():.2%}")


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
