"""Linear probing: how linearly separable an encoder's frozen embeddings are.

Embeddings (mean of the patch tokens, or CLS) of a training and a test split are fed
to a closed-form ridge classifier on standardised features; the test accuracy is the
probe's score. The demo prints it for the pretrained encoder and for a randomly
initialised one, so the value of pretraining is visible in one line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asda_jax import evaluation, hardware
from asda_jax import model as model_lib
from asda_jax.data import pipeline


def embed_split(
    encoder: model_lib.Encoder,
    param_sets: dict[str, Any],
    data_cfg: pipeline.InputConfig,
    forms: hardware.Forms,
    mesh,
    split: str,
    pooling: str = "mean",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Embeddings (N, D) of every clip of ``split`` under each parameter set, and the
    label matrix (N, C); the split is read and featurised once for all of them."""

    def embeddings(params, spec):
        out = encoder.apply({"params": params}, spec)
        return model_lib.pool(out, pooling).astype(jnp.float32)

    cfg = dataclasses.replace(data_cfg, split=split)
    return evaluation.over_split(embeddings, param_sets, cfg, forms, mesh)


def ridge_predictions(
    train_x: np.ndarray,  # (N, D)
    train_y: np.ndarray,  # (N, C) one-hot or multi-hot
    test_x: np.ndarray,  # (M, D)
    l2: float = 1.0,
) -> np.ndarray:  # (M, C) scores
    """Scores of a ridge classifier (with a bias) fit to ``train_y`` on features
    standardised by the training split's mean and spread. A feature that barely varies
    in training (a silent band) is scaled by at least a hundredth of the median
    feature's spread: at unit variance its rounding noise would weigh like a signal,
    and a test clip's small change in it like hundreds of standard deviations."""
    mean, std = train_x.mean(0), train_x.std(0)
    std = np.maximum(std, 1e-2 * np.median(std) + 1e-12)
    a, b = (train_x - mean) / std, (test_x - mean) / std
    a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    b = np.concatenate([b, np.ones((b.shape[0], 1))], axis=1)
    weights = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ train_y)
    return b @ weights


def ridge_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    l2: float = 1.0,
) -> float:
    """Test accuracy of a ridge classifier fit to one-hot (or multi-hot) targets."""
    scores = ridge_predictions(train_x, train_y, test_x, l2)
    return float(np.mean(scores.argmax(1) == test_y.argmax(1)))


def balanced_accuracy(true: np.ndarray, predicted: np.ndarray) -> float:
    """The mean over the classes present in ``true`` of each one's recall: a majority
    class counts as much as a rare one, and always guessing one class scores
    1 / classes."""
    classes = np.unique(true)
    return float(np.mean([np.mean(predicted[true == c] == c) for c in classes]))


def probe_accuracies(
    encoder, param_sets: dict, data_cfg, forms, mesh, train_split: str, test_split: str
) -> dict[str, float]:
    train_x, train_y = embed_split(encoder, param_sets, data_cfg, forms, mesh, train_split)
    test_x, test_y = embed_split(encoder, param_sets, data_cfg, forms, mesh, test_split)
    return {
        name: ridge_accuracy(train_x[name], train_y, test_x[name], test_y) for name in param_sets
    }


def compare_with_random_init(
    task, encoder_params, mesh, train_split: str, test_split: str, seed: int
) -> dict[str, float]:
    """Probe accuracy of ``encoder_params`` and of a randomly initialised encoder of the
    same pretraining ``task`` (its encoder, data and chip forms)."""
    cfg = task.model_cfg
    shape = (1, task.data_cfg.target_frames, cfg.num_mel_bins)
    random_params = nn.meta.unbox(task.encoder.init(jax.random.PRNGKey(seed + 1), jnp.zeros(shape)))
    param_sets = {"pretrained": encoder_params, "random_init": random_params["params"]}
    return probe_accuracies(
        task.encoder, param_sets, task.data_cfg, task.forms, mesh, train_split, test_split
    )
