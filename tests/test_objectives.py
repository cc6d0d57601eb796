"""Masking and the pretraining objective against independent NumPy / PyTorch versions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asda_jax import masking, objectives, release_weights
from asda_jax import model as model_lib
from asda_jax.testing import torch_reference as ref
from tests.test_training_update import release_ema_decay

RELEASE_GRID = (64, 8)


def release_inverse_block_mask(rng, grid, mask_prob=0.8, adjust=0.07, length=5):
    """compute_block_mask_2d(inverse_mask=True) as the release runs it, for one clone."""
    t_size, f_size = grid
    total = t_size * f_size
    keep = 1 - mask_prob
    centres = rng.integers(0, total, size=int(total * (keep + adjust) / length**2))
    mask = np.zeros((t_size, f_size))
    offset = length // 2
    for c in centres:
        t, f = divmod(int(c), f_size)
        for i in range(length):
            for j in range(length):
                mask[
                    np.clip(t + i - offset, 0, t_size - 1), np.clip(f + j - offset, 0, f_size - 1)
                ] = 1
    mask = mask.ravel()
    target = int(total * keep)
    ones, zeros = np.flatnonzero(mask == 1), np.flatnonzero(mask == 0)
    if ones.size > target:
        mask[rng.choice(ones, ones.size - target, replace=False)] = 0
    elif ones.size < target:
        mask[rng.choice(zeros, target - ones.size, replace=False)] = 1
    return 1 - mask  # 1 = masked


def test_release_masks_keep_exactly_102_of_512_patches():
    cfg = masking.MaskConfig()
    kept, masked = masking.clone_masks(jax.random.key(0), 3, RELEASE_GRID, cfg)
    assert cfg.num_centres(512) == 5 and kept.shape == (48, 102) and masked.shape == (48, 512)
    assert np.all(np.asarray(masked).sum(1) == 410)
    rows = np.arange(48)[:, None]
    assert not np.asarray(masked)[rows, np.asarray(kept)].any()
    assert np.all(np.diff(np.asarray(kept), axis=1) > 0)  # sorted, distinct
    again, _ = masking.clone_masks(jax.random.key(0), 3, RELEASE_GRID, cfg)
    np.testing.assert_array_equal(again, kept)


def test_masks_follow_the_release_distribution():
    """Per-patch keep rates (edges are clamped, so the map is not uniform) and how
    many kept patches touch another kept patch match the release's procedure."""
    samples = 4000
    _, masked = masking.clone_masks(
        jax.random.key(1), samples // 16, RELEASE_GRID, masking.MaskConfig()
    )
    ours = ~np.asarray(masked)
    rng = np.random.default_rng(0)
    theirs = np.stack([release_inverse_block_mask(rng, RELEASE_GRID) == 0 for _ in range(samples)])

    def neighbours(kept):
        grid = kept.reshape(-1, *RELEASE_GRID)
        padded = np.pad(grid, ((0, 0), (1, 1), (1, 1)))
        touching = (
            padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
        )
        return (grid & touching).sum((1, 2)).mean()

    per_frequency = lambda kept: kept.reshape(-1, *RELEASE_GRID).mean((0, 1))
    np.testing.assert_allclose(per_frequency(ours), per_frequency(theirs), atol=0.01)
    assert abs(neighbours(ours) - neighbours(theirs)) < 1.5


def test_teacher_targets_match_the_release_formula():
    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((2, 1 + 12, 16)).astype(np.float32) * (i + 1) for i in range(3)]
    ours = objectives.teacher_targets(tuple(jnp.asarray(x) for x in layers), top_k=2)
    with torch.no_grad():
        normed = [
            F.instance_norm(torch.from_numpy(x[:, 1:]).transpose(1, 2)).transpose(1, 2)
            for x in layers[-2:]
        ]
        expected = F.layer_norm(sum(normed) / 2, (16,)).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def float64_ema_weight(n: int, cfg: objectives.PretrainConfig) -> float:
    """1 − d(n) in double precision, d as the release anneals it (the update oracle's)."""
    return 1.0 - release_ema_decay(n, cfg.ema_decay, cfg.ema_end_decay, cfg.ema_anneal_end_step)


def test_ema_weight_equals_the_float64_formula_along_the_release_schedule():
    cfg = objectives.PretrainConfig()  # 0.9998 → 0.99999 over 100 000 updates
    steps = [0, 50_000, 99_999, 100_000, 200_000]
    got = jax.jit(objectives.ema_weight, static_argnums=1)(jnp.array(steps), cfg)
    want = [float64_ema_weight(n, cfg) for n in steps]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6)
    assert want[-1] == pytest.approx(1e-5, rel=1e-9)  # 1 − 0.99999, not float32's 9.954e-6


@pytest.mark.parametrize("start", [99_500, 199_000], ids=["across-the-anneal-end", "after"])
def test_teacher_approaches_a_constant_student_at_the_float64_rate(start):
    """After 1 000 updates the teacher has moved (student − teacher)·(1 − ∏(1 − w))."""
    cfg = objectives.PretrainConfig()
    student = {"w": jnp.array([1.0, -2.0, 0.5])}
    teacher = {"w": jnp.zeros(3)}

    def update(n, teacher):
        return objectives.ema_update(teacher, student, objectives.ema_weight(n, cfg))

    moved = jax.jit(lambda t: jax.lax.fori_loop(start, start + 1000, update, t))(teacher)
    kept = np.prod([1.0 - float64_ema_weight(n, cfg) for n in range(start, start + 1000)])
    expected = np.array([1.0, -2.0, 0.5]) * (1.0 - kept)
    np.testing.assert_allclose(np.asarray(moved["w"], np.float64), expected, rtol=1e-4)


def test_ema_weight_handles_every_schedule_the_config_allows():
    constant = objectives.PretrainConfig(ema_decay=0.999, ema_end_decay=0.999)
    no_anneal = objectives.PretrainConfig(ema_anneal_end_step=0)
    falling = objectives.PretrainConfig(ema_decay=0.9, ema_end_decay=0.5, ema_anneal_end_step=10)
    for cfg in (constant, no_anneal, falling):
        steps = [0, 5, 10, 20]
        want = [float64_ema_weight(n, cfg) for n in steps]
        np.testing.assert_allclose(objectives.ema_weight(jnp.array(steps), cfg), want, rtol=1e-6)
    with pytest.raises(ValueError, match="ema_decay"):
        objectives.PretrainConfig(ema_end_decay=1.5).validate()
    with pytest.raises(ValueError, match="ema_anneal_end_step"):
        objectives.PretrainConfig(ema_anneal_end_step=-1).validate()


# ---------------------------------------------------------------------------- one step vs PyTorch


TINY = dict(embed_dim=32, depth=2, num_heads=4, decoder_dim=32, decoder_layers=2, decoder_groups=4)


def test_one_step_loss_and_gradients_equal_pytorch():
    clones, frames = 3, 128  # 8×8 grid
    cfg_model = model_lib.ModelConfig(**TINY)
    cfg = objectives.PretrainConfig(average_top_k_layers=2)
    mask_cfg = masking.MaskConfig(mask_length=3, clone_batch=clones)
    common = dict(
        dim=32, depth=2, num_heads=4, max_time_patches=768, decoder_groups=4, decoder_grid=(8, 8)
    )
    student = ref.randomize_(ref.ReleaseModel(**common, decoder_layers=2), seed=1)
    teacher = ref.randomize_(ref.ReleaseModel(**common), seed=2)
    spec = np.random.default_rng(3).standard_normal((2, frames, 128)).astype(np.float32)
    kept, masked = masking.clone_masks(jax.random.key(4), 2, (8, 8), mask_cfg)
    noise = 0.01 * jax.random.normal(jax.random.key(5), (*masked.shape, 32))

    state = ref.state_dict_numpy(student)
    params = {
        "encoder": release_weights.encoder_params(state, cfg_model),
        "decoder": release_weights.decoder_params(state, cfg_model),
    }
    teacher_params = release_weights.encoder_params(ref.state_dict_numpy(teacher), cfg_model)
    encoder, decoder = model_lib.Encoder(cfg_model), model_lib.Decoder(cfg_model)

    def loss_fn(params):
        return objectives.pretraining_loss_given(
            encoder, decoder, params, teacher_params, jnp.asarray(spec), kept, masked, noise,
            clones, cfg, jax.random.key(6),
        )  # fmt: skip

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    expected = ref.pretraining_objective(
        student, teacher, torch.from_numpy(spec), torch.from_numpy(np.asarray(kept)).long(),
        torch.from_numpy(np.asarray(masked)), torch.from_numpy(np.asarray(noise)), clones,
        cfg.average_top_k_layers, cfg.cls_loss, cfg.utterance_rows,
    )  # fmt: skip
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    torch_grads = {k: p.grad.numpy() for k, p in student.named_parameters() if p.grad is not None}
    torch_grads = {k: torch_grads.get(k, np.zeros(v.shape, np.float32)) for k, v in state.items()}
    expected_grads = {
        "encoder": release_weights.encoder_params(torch_grads, cfg_model),
        "decoder": release_weights.decoder_params(torch_grads, cfg_model),
    }
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    want = jax.tree.leaves(expected_grads)
    assert len(flat) == len(want)
    for (path, got), exp in zip(flat, want, strict=True):
        scale = max(np.abs(exp).max(), 1e-8)
        np.testing.assert_allclose(
            got / scale, exp / scale, atol=1e-4, err_msg=jax.tree_util.keystr(path)
        )


def test_loss_is_sharding_invariant_in_its_weighting():
    """The utterance term weighs ``utterance_rows`` rows, whatever the batch."""
    cfg = objectives.PretrainConfig(cls_loss=0.5, utterance_rows=192)
    targets = jnp.zeros((2, 4, 16))
    cls = jnp.ones((4, 16))  # 2 clips × 2 clones, each row's error ‖1‖²/√16 = 4
    predictions = jnp.zeros((4, 4, 16))
    masked = jnp.ones((4, 4), bool)
    loss, stats = objectives.pretraining_loss(cls, predictions, targets, masked, 2, cfg)
    assert float(stats["frame_loss"]) == 0.0
    assert float(stats["utterance_loss"]) == pytest.approx(0.5 * 192 * 4.0)
    assert float(loss) == pytest.approx(384.0)


def test_gradients_reach_every_student_parameter():
    cfg_model = model_lib.ModelConfig(**TINY)
    encoder, decoder = model_lib.Encoder(cfg_model), model_lib.Decoder(cfg_model)
    spec = jax.random.normal(jax.random.key(0), (2, 64, 128))
    params = {
        "encoder": nn.meta.unbox(encoder.init(jax.random.key(1), spec))["params"],
        "decoder": nn.meta.unbox(decoder.init(jax.random.key(2), jnp.zeros((1, 4, 8, 32))))[
            "params"
        ],
    }
    mask_cfg = masking.MaskConfig(mask_length=2, clone_batch=2)
    grads = jax.jit(jax.grad(
        lambda p: objectives.pretraining_step_loss(
            encoder, decoder, p, params["encoder"], spec, jax.random.key(3), mask_cfg,
            objectives.PretrainConfig(average_top_k_layers=2),
        )[0]
    ))(params)  # fmt: skip
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
