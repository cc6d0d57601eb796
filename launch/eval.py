"""Evaluates a fine-tuning checkpoint on a split and writes its metrics as JSON.

    python launch/eval.py --workdir=/ckpt/as20k [--step=60000] [--split=eval] \
        [--data_dir=...] [--output=metrics.json]

Full-length, augmentation-free evaluation of every clip of the split (the run's
``eval_data`` unless overridden), on all local devices: mAP, mean AUC and d-prime where
classes have positives, and accuracy. Exit code 2 for a missing run, checkpoint or
dataset.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses
import json
import sys

import jax
import ml_collections
from absl import app, flags

from asda_jax import (
    checkpoints,
    cli,
    config_lib,
    evaluation,
    finetuning,
    hardware,
    inference,
    sharding,
    storage,
    train_state,
)
from asda_jax.data import datasets

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A fine-tuning run's workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("split", None, "Split to evaluate (default: the run's eval split).")
flags.DEFINE_string("data_dir", None, "Where the dataset is prepared (default: the run's).")
flags.DEFINE_integer("batch_size", None, "Evaluation batch (default: the run's).")
flags.DEFINE_string("output", None, "JSON file (default: <workdir>/eval-<step>-<split>.json).")
flags.mark_flags_as_required(["workdir"])


def evaluation_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's config, evaluated on this machine's devices in their chip's forms (not
    the run's execution settings), with the flags' overrides."""
    config = config.copy_and_resolve_references()
    config.execution = ml_collections.ConfigDict()
    config.mesh = dict(sharding.DATA_PARALLEL)
    config.mesh_dcn = None
    config.num_processes = None
    block = config.eval_data if config.get("eval_data") else config.data
    overrides = {"split": FLAGS.split, "data_dir": FLAGS.data_dir, "batch_size": FLAGS.batch_size}
    config.eval_data = dict(block, **{k: v for k, v in overrides.items() if v is not None})
    config.data.data_dir = config.eval_data.data_dir
    return config


def main(argv):
    del argv
    try:
        saved = ml_collections.ConfigDict(inference.saved_config(FLAGS.workdir))
        config = evaluation_config(saved)
        mesh = sharding.make_mesh(dict(config.mesh))
        task = finetuning.FinetuneTask(config_lib.read(config, hardware.of_mesh(mesh)))
        eval_cfg = dataclasses.replace(
            task.eval_cfg, batch_size=_fit(task.eval_cfg.batch_size, mesh)
        )
        plan = train_state.plan_state(task, mesh, jax.random.PRNGKey(0))
        item, prefix = checkpoints.locate_params(FLAGS.workdir, FLAGS.step)
        params = checkpoints.restore_item(item, prefix, plan.restore_target().params)
        results = evaluation.evaluate(task, params, eval_cfg, mesh)
    except (checkpoints.CheckpointMismatch, datasets.DatasetNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    step = item.parent.name if item.parent.name.isdigit() else "export"
    results = {"checkpoint": str(item.parent), "split": eval_cfg.split, **results}
    output = storage.path(
        FLAGS.output or storage.path(FLAGS.workdir) / f"eval-{step}-{eval_cfg.split}.json"
    )
    if jax.process_index() == 0:
        output.write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))


def _fit(batch_size: int, mesh) -> int:
    """The batch rounded up to a multiple of the data-parallel size."""
    parallel = sharding.data_parallel_size(mesh) * jax.process_count()
    return -(-batch_size // parallel) * parallel


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
