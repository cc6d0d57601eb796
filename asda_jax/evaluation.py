"""One evaluation loop: every clip of a split once, in order, on any number of hosts.

The split is read without augmentation, padded to whole batches with invalid rows
(``pipeline.make_pipeline(train=False)``), and each batch is run on the mesh by one
jitted forward per parameter set; the padding rows are dropped on the way back.
Fine-tuning metrics (``evaluate``) and the linear probe's embeddings (probe.py) are
both this loop with a different forward.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from asda_jax import finetuning, hardware, metrics, progress, report, sharding, storage
from asda_jax.data import datasets, pipeline


def over_split(
    forward: Callable[[Any, jax.Array], jax.Array],
    param_sets: Mapping[str, Any],
    data_cfg: pipeline.InputConfig,
    forms: hardware.Forms,
    mesh,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``forward(params, spec)`` over every clip of ``data_cfg.split`` for each parameter
    set: ({name: (N, ...) outputs}, (N, C) labels), the split read and featurised once."""
    cfg = dataclasses.replace(data_cfg, random_crop=False, roll_and_gain=False)

    @jax.jit
    def run(params, batch):
        spec, _ = pipeline.spectrograms(batch, cfg, forms)
        return forward(params, spec)

    outputs: dict[str, list] = {name: [] for name in param_sets}
    labels = []
    batches = pipeline.make_pipeline(cfg, train=False)
    if jax.process_index() == 0:
        batches = progress.progress(batches, f"evaluate {cfg.split}", unit="batches")
    with sharding.activate(mesh):
        for host_batch in batches:
            batch = pipeline.to_global(host_batch, mesh)
            valid = sharding.to_host(batch["valid"])
            labels.append(sharding.to_host(batch["labels"])[valid])
            for name, params in param_sets.items():
                outputs[name].append(sharding.to_host(run(params, batch))[valid])
    return {k: np.concatenate(v) for k, v in outputs.items()}, np.concatenate(labels)


def scores_and_labels(
    task: finetuning.FinetuneTask, params, data_cfg: pipeline.InputConfig, mesh
) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) scores of ``params`` and (N, C) labels over ``data_cfg.split``."""
    outputs, labels = over_split(task.scores, {"scores": params}, data_cfg, task.forms, mesh)
    return outputs["scores"], labels


def evaluate(
    task: finetuning.FinetuneTask, params, data_cfg: pipeline.InputConfig, mesh
) -> dict[str, float]:
    """The classification metrics of ``params`` on ``data_cfg.split``."""
    return metrics.classification_metrics(*scores_and_labels(task, params, data_cfg, mesh))


def final_evaluation(state, task: finetuning.FinetuneTask, mesh, workdir) -> dict[str, float]:
    """Metrics of a run's final parameters on its eval split, also in <workdir>/eval.json,
    and each clip's scores in <workdir>/predictions.csv (what its report is drawn from)."""
    cfg = task.eval_cfg
    scores, labels = scores_and_labels(task, state.params, cfg, mesh)
    results = metrics.classification_metrics(scores, labels)
    if jax.process_index() == 0:
        workdir = storage.path(workdir)
        names = datasets.load(cfg.dataset, cfg.data_dir).class_names
        report.write_predictions(workdir / report.PREDICTIONS_FILE, scores, labels, names)
        (workdir / report.EVAL_FILE).write_text(json.dumps(results, indent=2))
    return results
