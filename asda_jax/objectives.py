"""The self-supervised objective (data2vec 2.0 / EAT "UFO" as the release runs it).

    teacher (EMA encoder, all patches) ─▶ targets y: top-k blocks' MLP outputs,
        instance-normalised over time per layer, averaged, layer-normalised
    student (encoder, kept patches of C clones) ─▶ CLS  c  and tokens
        tokens scattered back into the grid, masked slots ~ N(0, 0.01²) ─▶ CNN decoder ─▶ ŷ

    frame     = mean over masked slots of ‖ŷ − y‖² / √D
    utterance = cls_loss · R · mean over rows of ‖c − mean_t(y)‖² / √D
    loss      = frame + utterance

R is ``utterance_rows``: in the release the utterance term is summed over one GPU's
rows (12 clips × 16 clones = 192) while the frame term is a mean, so the release's
weighting is reproduced with R = 192 whatever the mesh (the loss stays independent
of how many devices share the batch).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from asda_jax import masking
from asda_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    average_top_k_layers: int = 12
    mask_noise_std: float = 0.01
    cls_loss: float = 0.5
    utterance_rows: int = 192
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100_000
    min_target_var: float = 0.1  # collapse guards (data2vec's defaults; the release sets 0)
    min_pred_var: float = 0.01
    collapse_check_after: int = 5_000


# ---------------------------------------------------------------------------- teacher


def instance_norm(x: jax.Array, axis: int, eps: float = 1e-5) -> jax.Array:
    mean = x.mean(axis=axis, keepdims=True)
    var = jnp.square(x - mean).mean(axis=axis, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def teacher_targets(layer_results, top_k: int) -> jax.Array:  # (B, L, D) float32
    """Targets from the last ``top_k`` blocks' MLP outputs (B, 1 + L, D), CLS dropped."""
    layers = [f[:, 1:].astype(jnp.float32) for f in layer_results[-top_k:]]
    averaged = sum(instance_norm(f, axis=1) for f in layers) / len(layers)
    return instance_norm(averaged, axis=-1)  # LayerNorm without affine, eps 1e-5


def ema_decay(step: jax.Array, cfg: PretrainConfig) -> jax.Array:
    """Linear anneal from ema_decay to ema_end_decay over ema_anneal_end_step updates."""
    fraction = jnp.minimum(step / cfg.ema_anneal_end_step, 1.0)
    return cfg.ema_decay + (cfg.ema_end_decay - cfg.ema_decay) * fraction


def ema_update(teacher, student, decay: jax.Array):
    return jax.tree.map(lambda t, s: decay * t + (1.0 - decay) * s, teacher, student)


# ---------------------------------------------------------------------------- student


def grid_shape(spec_frames: int, cfg: model_lib.ModelConfig) -> tuple[int, int]:
    return spec_frames // cfg.patch_size, cfg.freq_patches


def decoder_input(
    visible: jax.Array,  # (R, K, D) student outputs of the kept patches
    kept: jax.Array,  # (R, K) their grid indices
    noise: jax.Array,  # (R, L, D) what the masked slots hold
) -> jax.Array:  # (R, L, D)
    """Kept outputs back in their grid slots; the masked slots keep the noise."""
    rows = visible.shape[0]
    return noise.astype(visible.dtype).at[jnp.arange(rows)[:, None], kept].set(visible)


def student_forward(
    encoder: model_lib.Encoder,
    decoder: model_lib.Decoder,
    params,
    spec: jax.Array,  # (B, T, F)
    kept: jax.Array,  # (B·C, K)
    noise: jax.Array,  # (B·C, L, D)
    clones: int,
    dropout_key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(CLS outputs (B·C, D), decoder predictions (B·C, L, D)) of the masked clones."""
    enc = {"params": params["encoder"]}
    patches = encoder.apply(enc, spec, method=model_lib.Encoder.embed)  # (B, L, D)
    patches = jnp.repeat(patches, clones, axis=0)  # (B·C, L, D), clone-minor
    visible = jnp.take_along_axis(patches, kept[..., None], axis=1)  # (B·C, K, D)
    out = encoder.apply(
        enc,
        visible,
        None,
        True,
        method=model_lib.Encoder.contextualize,
        rngs={"dropout": dropout_key},
    )
    grid = grid_shape(spec.shape[1], encoder.cfg)
    full = decoder_input(out.tokens[:, 1:], kept, noise)
    predictions = decoder.apply(
        {"params": params["decoder"]}, full.reshape(-1, *grid, full.shape[-1])
    )
    return out.tokens[:, 0], predictions


def teacher_forward(encoder: model_lib.Encoder, teacher_params, spec: jax.Array, top_k: int):
    """Targets (B, L, D) from the EMA teacher over every patch, without gradients."""
    out = encoder.apply({"params": teacher_params}, spec)
    return jax.lax.stop_gradient(teacher_targets(out.layer_results, top_k))


# ---------------------------------------------------------------------------- losses


def masked_spread(x: jax.Array, weights: jax.Array) -> jax.Array:
    """data2vec's collapse statistic: mean over channels of √(var over slots + 1e-6)."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    w = weights.reshape(-1, 1).astype(jnp.float32)
    count = w.sum()
    mean = (x * w).sum(0) / count
    var = (jnp.square(x - mean) * w).sum(0) / jnp.maximum(count - 1.0, 1.0)
    return jnp.sqrt(var + 1e-6).mean()


def pretraining_loss(
    cls: jax.Array,  # (B·C, D)
    predictions: jax.Array,  # (B·C, L, D)
    targets: jax.Array,  # (B, L, D)
    masked: jax.Array,  # (B·C, L) bool
    clones: int,
    cfg: PretrainConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The release's frame + utterance loss, and the statistics the loop watches."""
    scale = 1.0 / math.sqrt(predictions.shape[-1])
    repeated = jnp.repeat(targets, clones, axis=0)  # (B·C, L, D)
    slot_error = jnp.square(predictions.astype(jnp.float32) - repeated).sum(-1) * scale
    weights = masked.astype(jnp.float32)
    frame = (slot_error * weights).sum() / weights.sum()
    utterance_target = jnp.repeat(targets.mean(axis=1), clones, axis=0)  # (B·C, D)
    row_error = jnp.square(cls.astype(jnp.float32) - utterance_target).sum(-1) * scale
    utterance = cfg.cls_loss * cfg.utterance_rows * row_error.mean()
    loss = frame + utterance
    stats = {
        "loss": loss,
        "frame_loss": frame,
        "utterance_loss": utterance,
        "target_var": masked_spread(repeated, weights),
        "pred_var": masked_spread(predictions, weights),
    }
    return loss, stats


def pretraining_loss_given(
    encoder, decoder, params, teacher_params, spec, kept, masked, noise, clones, cfg, dropout_key
):
    """The loss of one batch for given masks (kept, masked) and decoder noise."""
    targets = teacher_forward(encoder, teacher_params, spec, cfg.average_top_k_layers)
    cls, predictions = student_forward(
        encoder, decoder, params, spec, kept, noise, clones, dropout_key
    )
    return pretraining_loss(cls, predictions, targets, masked, clones, cfg)


def pretraining_step_loss(
    encoder, decoder, params, teacher_params, spec, key, mask_cfg: masking.MaskConfig, cfg
):
    """Masks and decoder noise drawn from ``key``, then the loss of the batch."""
    mask_key, noise_key, dropout_key = jax.random.split(key, 3)
    grid = grid_shape(spec.shape[1], encoder.cfg)
    kept, masked = masking.clone_masks(mask_key, spec.shape[0], grid, mask_cfg)
    shape = (*masked.shape, encoder.cfg.embed_dim)
    noise = cfg.mask_noise_std * jax.random.normal(noise_key, shape)
    return pretraining_loss_given(
        encoder, decoder, params, teacher_params, spec, kept, masked, noise,
        mask_cfg.clone_batch, cfg, dropout_key,
    )  # fmt: skip
