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

from asda_jax import model as model_lib
from asda_jax import sharding
from asda_jax.data import pipeline


def embed_split(
    encoder: model_lib.Encoder,
    param_sets: dict[str, Any],
    data_cfg: pipeline.InputConfig,
    mesh,
    split: str,
    pooling: str = "mean",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Embeddings (N, D) of every clip of ``split`` under each parameter set, and the
    label matrix (N, C); the split is read and featurised once for all of them."""
    cfg = dataclasses.replace(data_cfg, split=split, random_crop=False, roll_and_gain=False)

    @jax.jit
    def forward(params, batch):
        spec, _ = pipeline.spectrograms(batch, cfg)
        out = encoder.apply({"params": params}, spec)
        return model_lib.pool(out, pooling).astype(jnp.float32)

    embeddings: dict[str, list] = {name: [] for name in param_sets}
    labels = []
    with sharding.activate(mesh):
        for host_batch in pipeline.make_pipeline(cfg, train=False):
            batch = pipeline.to_global(host_batch, mesh)
            valid = sharding.to_host(batch["valid"])
            labels.append(sharding.to_host(batch["labels"])[valid])
            for name, params in param_sets.items():
                embeddings[name].append(sharding.to_host(forward(params, batch))[valid])
    return {k: np.concatenate(v) for k, v in embeddings.items()}, np.concatenate(labels)


def ridge_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    l2: float = 1.0,
) -> float:
    """Test accuracy of a ridge classifier fit to one-hot (or multi-hot) targets."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mean) / std, (test_x - mean) / std
    a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    b = np.concatenate([b, np.ones((b.shape[0], 1))], axis=1)
    weights = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ train_y)
    return float(np.mean((b @ weights).argmax(1) == test_y.argmax(1)))


def probe_accuracies(
    encoder, param_sets: dict, data_cfg, mesh, train_split: str, test_split: str
) -> dict[str, float]:
    train_x, train_y = embed_split(encoder, param_sets, data_cfg, mesh, train_split)
    test_x, test_y = embed_split(encoder, param_sets, data_cfg, mesh, test_split)
    return {
        name: ridge_accuracy(train_x[name], train_y, test_x[name], test_y) for name in param_sets
    }


def compare_with_random_init(
    model_cfg: model_lib.ModelConfig,
    encoder_params,
    data_cfg: pipeline.InputConfig,
    mesh,
    train_split: str,
    test_split: str,
    seed: int,
) -> dict[str, float]:
    """Probe accuracy of ``encoder_params`` and of a randomly initialised encoder."""
    encoder = model_lib.Encoder(model_cfg)
    spec = jnp.zeros((1, data_cfg.target_frames, model_cfg.num_mel_bins))
    random_params = nn.meta.unbox(encoder.init(jax.random.PRNGKey(seed + 1), spec))["params"]
    param_sets = {"pretrained": encoder_params, "random_init": random_params}
    return probe_accuracies(encoder, param_sets, data_cfg, mesh, train_split, test_split)
