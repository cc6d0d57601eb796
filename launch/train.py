"""Trains a model: pretraining or fine-tuning, as the config's ``task`` says.

    python launch/train.py --config=configs/demo.py --workdir=workdirs/demo
    python launch/train.py --config=configs/pretrain_as2m.py:mesh=v4-32 --workdir=/ckpt/as2m

Override any field with --config.block.field=value. A workdir that holds checkpoints
is resumed from its latest one. On a multi-host TPU pod or GPU cluster run the same
command on every host: jax.distributed.initialize() joins them (pass
--coordinator_address/--num_processes/--process_id where nothing detects it).

Exit codes: 0 done (or stopped by SIGTERM after saving), 2 bad config or missing data,
3 the run stopped itself (NaN loss or collapse; the last checkpoint is intact).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (used by clu) is chatty

from asda_jax import launch_env

launch_env.reexec_with_launcher_environment()  # before anything loads: asda_jax/launch_env.py

import json
import sys

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from asda_jax import cli, config_lib, evaluation, probe, report, storage, train_lib, train_state
from asda_jax.data import builders, datasets

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here.")
cli.define_cluster_flags()
flags.mark_flags_as_required(["config", "workdir"])


def prepare_dataset(config) -> None:
    """The synthetic default, or a dataset whose config names its ``data.source``, is
    prepared here if it is not there yet (a prepared one is reused as it is)."""
    data = config.data
    if data.dataset != "synthetic" and not data.get("source"):
        return
    if jax.process_index() == 0:
        datasets.prepare(data.dataset, data.data_dir, source_dir=data.get("source") or None)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dataset ready")


def report_probe(state, task, mesh, workdir: epath.Path) -> None:
    splits = task.config.probe
    results = probe.compare_with_random_init(
        task,
        state.params["encoder"],
        mesh,
        splits["train_split"],
        splits["test_split"],
        task.config.seed,
    )
    if jax.process_index() == 0:
        (workdir / "probe.json").write_text(json.dumps(results, indent=2))
        print(
            f"linear-probe accuracy on {task.data_cfg.dataset}:{splits['test_split']}: "
            f"pretrained {results['pretrained']:.1%}, random init {results['random_init']:.1%}"
        )


def report_evaluation(state, task, mesh, workdir: epath.Path) -> None:
    results = evaluation.final_evaluation(state, task, mesh, workdir)
    if jax.process_index() == 0:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if k != "num_clips")
        print(f"{task.eval_cfg.dataset}:{task.eval_cfg.split} at step {int(state.step)}: {shown}")
        print(f"report: {report.write(workdir)}")


def main(argv):
    del argv
    config = FLAGS.config
    workdir = storage.path(FLAGS.workdir)
    try:
        cli.join_processes(config)
        prepare_dataset(config)
        state, task, mesh = train_lib.train(config, workdir)
    except (
        config_lib.ConfigError,
        datasets.DatasetNotFoundError,
        builders.DatasetLayoutError,
        storage.MissingBucket,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except train_state.TrainingStopped as e:
        logging.error("%s", e)
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(3)
    if int(state.step) != task.config.num_train_steps:
        return  # stopped early by SIGTERM: nothing final to report
    if task.config.probe:
        report_probe(state, task, mesh, workdir)
    if task.config.task != "pretrain" and task.eval_cfg is not None:
        report_evaluation(state, task, mesh, workdir)


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
