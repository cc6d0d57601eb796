"""Metrics against scikit-learn and hand cases; the fine-tuning recipe's pieces."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats
from sklearn import metrics as skm

from asda_jax import metrics, objectives, optim
from asda_jax import model as model_lib


@pytest.mark.parametrize("seed", range(4))
def test_map_equals_sklearn_macro_average_precision_over_classes_with_positives(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random((60, 12)) < 0.2).astype(np.float64)
    targets[:, :2] = 0  # classes without positives are left out
    scores = rng.random((60, 12))
    scores[:, 5] = np.round(scores[:, 5], 1)  # ties
    classes = np.flatnonzero(targets.sum(0) > 0)
    expected = skm.average_precision_score(targets[:, classes], scores[:, classes], average=None)
    assert metrics.mean_average_precision(scores, targets) == pytest.approx(expected.mean(), 1e-12)
    for c in classes:
        assert metrics.roc_auc(scores[:, c], targets[:, c]) == pytest.approx(
            skm.roc_auc_score(targets[:, c], scores[:, c]), 1e-12
        )


def test_accuracy_d_prime_and_ap_on_hand_computed_cases():
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([[0, 1], [1, 0], [1, 0], [0, 1]])
    assert metrics.accuracy(scores, labels) == 0.5
    # ranking 1, 0, 1 (scores .9 .5 .1): AP = (1/1 + 2/3) / 2
    assert metrics.average_precision(
        np.array([0.9, 0.5, 0.1]), np.array([1, 0, 1])
    ) == pytest.approx(5 / 6, 1e-15)
    assert metrics.roc_auc(np.array([1.0, 1.0]), np.array([1, 0])) == 0.5  # a tie counts ½
    assert metrics.d_prime(0.5) == 0.0
    # two unit Gaussians one apart: AUC = Φ(1/√2)
    assert metrics.d_prime(stats.norm.cdf(1 / np.sqrt(2))) == pytest.approx(1.0, 1e-12)
    result = metrics.classification_metrics(scores, labels)
    assert result["num_clips"] == 4 and result["accuracy"] == 0.5
    assert result["mean_auc"] == pytest.approx(0.75)  # both classes: 3 of 4 pairs ordered


def tiny_classifier_params(depth=3):
    cfg = model_lib.preset("tiny", depth=depth)
    classifier = model_lib.Classifier(cfg, num_classes=5)
    params = classifier.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 128)))["params"]
    return nn.meta.unbox(params), depth


def test_layer_decay_multipliers_follow_the_release_rule():
    params, depth = tiny_classifier_params()
    scales = optim.lr_scales(params, depth, 0.65)
    flat = {
        "/".join(optim.path_names(p)): s for p, s in jax.tree_util.tree_leaves_with_path(scales)
    }
    for name, scale in flat.items():
        if "/blocks_" in name:
            block = int(name.split("/blocks_")[1].split("/")[0])
            assert scale == pytest.approx(0.65 ** (depth - block)), name
        else:  # embeddings, CLS, context norm, fc_norm, head: the full rate
            assert scale == 1.0, name
    assert {round(s, 6) for s in flat.values()} == {1.0, 0.65, 0.4225, 0.274625}


def test_the_optimiser_applies_each_multiplier():
    """Adam's first step is lr·scale·sign(g): the update sizes are the multipliers."""
    params, depth = tiny_classifier_params()
    cfg = optim.OptimConfig(
        lr=1e-3, warmup_steps=0, decay_steps=10, weight_decay=0.0, layer_decay=0.65,
        clip_norm=0.0, eps=1e-20,
    )  # fmt: skip
    tx = optim.make_optimizer(cfg, params, depth=depth)
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    scales = optim.lr_scales(params, depth, 0.65)
    for u, s in zip(jax.tree.leaves(updates), jax.tree.leaves(scales), strict=True):
        np.testing.assert_allclose(np.abs(u), 1e-3 * s, rtol=1e-5)


def test_losses_match_their_formulas():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 6)] * 0.7 + 0.3 / 4
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    cfg = objectives.FinetuneConfig
    got = objectives.classification_loss(logits, labels, cfg(loss="bce_per_label"))
    np.testing.assert_allclose(got, bce.sum() / labels.sum(), rtol=1e-5)
    got = objectives.classification_loss(logits, labels, cfg(loss="bce"))
    np.testing.assert_allclose(got, bce.sum(1).mean(), rtol=1e-5)
    smooth = labels * 0.9 + 0.1 / 4
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    got = objectives.classification_loss(logits, labels, cfg(loss="ce", label_smoothing=0.1))
    np.testing.assert_allclose(got, -(smooth * log_softmax).sum(1).mean(), rtol=1e-5)


def test_mixup_mixes_each_clip_with_its_mirror_and_keeps_label_mass():
    spec = jax.random.normal(jax.random.key(0), (6, 16, 8))
    labels = jnp.eye(3)[jnp.array([0, 1, 2, 0, 1, 2])]
    mixed, mixed_labels = objectives.mixup(jax.random.key(1), spec, labels, alpha=0.8, prob=1.0)
    lam = float(mixed_labels[0, 0])  # row 0 is class 0 mixed with row 5 (class 2)
    assert 0 < lam < 1
    np.testing.assert_allclose(mixed, lam * spec + (1 - lam) * spec[::-1], atol=1e-6)
    np.testing.assert_allclose(mixed_labels.sum(1), 1.0, atol=1e-6)
    same, same_labels = objectives.mixup(jax.random.key(1), spec, labels, alpha=0.8, prob=0.0)
    np.testing.assert_array_equal(same, spec)
    np.testing.assert_array_equal(same_labels, labels)


def test_spec_augment_zeroes_one_band_and_one_span_per_clip_within_the_widths():
    spec = jnp.ones((64, 100, 128))
    out = np.asarray(objectives.spec_augment(jax.random.key(3), spec, mask_ratio=0.2))
    for clip in out:
        freq = np.flatnonzero((clip == 0).all(axis=0))  # bins zero at every frame
        time = np.flatnonzero((clip == 0).all(axis=1))
        for band, limit in ((freq, 128 * 0.2), (time, 100 * 0.2)):
            assert band.size <= np.ceil(limit)  # both ends floored, as torchaudio
            if band.size:
                assert np.all(np.diff(band) == 1)  # one contiguous band
        zero = clip == 0
        expected = np.zeros_like(zero)
        expected[:, freq] = True
        expected[time, :] = True
        np.testing.assert_array_equal(zero, expected)
    widths = [(c == 0).all(axis=0).sum() for c in out]
    assert np.mean(widths) == pytest.approx(128 * 0.2 / 2, abs=3)  # U·25.6 on average


def test_noise_and_roll_rolls_each_clip_in_time_by_at_most_ten_frames():
    spec = jnp.broadcast_to(jnp.arange(50.0)[None, :, None], (8, 50, 4))
    out = np.asarray(objectives.noise_and_roll(jax.random.key(0), spec))
    for clip in out:
        shift = (np.round(clip[:, 0]).astype(int)[0] * -1) % 50  # out[0] = in[−shift]
        rolled = np.roll(np.arange(50.0), shift)
        assert shift <= 10 or shift >= 40
        assert np.all(clip - rolled[:, None] >= 0) and np.all(clip - rolled[:, None] < 0.1)


def test_the_optax_groups_are_the_distinct_multipliers():
    params, depth = tiny_classifier_params()
    cfg = optim.OptimConfig(lr=1e-3, warmup_steps=1, decay_steps=10, layer_decay=0.65)
    state = optim.make_optimizer(cfg, params, depth=depth).init(params)
    groups = next(s for s in state if isinstance(s, optax.MultiTransformState)).inner_states
    scales = {round(s, 6) for s in jax.tree.leaves(optim.lr_scales(params, depth, 0.65))}
    assert {round(float(k.split("×")[1]), 6) for k in groups} == scales
