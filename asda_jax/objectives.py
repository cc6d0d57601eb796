"""The training objectives: the self-supervised one, and fine-tuning's augmentation and losses.

Pretraining (data2vec 2.0 / EAT "UFO" as the release runs it):

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

Fine-tuning (docs/method.md §5), in the jitted step:

    spectrogram ─▶ [SPC-2: noise + ±10-frame roll] ─▶ mixup (p 0.9, Beta(α, α), batch
    flipped) ─▶ SpecAugment (one frequency band ≈ U·128·r, one time span ≈ U·T·r, fill 0)

with the losses ``bce_per_label`` (AudioSet: BCE summed over the batch and classes,
divided by the sum of the mixed labels), ``bce`` (SPC-2: summed over classes, mean over
clips) and ``ce`` (ESC-50: cross-entropy with label smoothing). Evaluation scores are
sigmoids for BCE and softmaxes for CE.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from asda_jax import masking, sharding
from asda_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """The objective's knobs under the release's names: targets, loss weights, EMA
    schedule, and the collapse guards the loop checks."""

    average_top_k_layers: int = 12
    mask_noise_std: float = 0.01
    cls_loss: float = 0.5
    utterance_rows: int = 192
    ema_decay: float = 0.9998
    ema_end_decay: float = 0.99999
    ema_anneal_end_step: int = 100_000
    # Collapse guards on the targets' and predictions' spread (``masked_std``), under
    # data2vec's names and defaults (the release sets 0).
    min_target_var: float = 0.1
    min_pred_var: float = 0.01
    collapse_check_after: int = 5_000
    # An export (ours, or imported weights) whose encoder student and teacher start from
    # (continued pretraining: ``config_lib.continue_from``); empty: random init.
    init_from: str = ""

    def validate(self) -> PretrainConfig:
        if not (0 <= self.ema_decay <= 1 and 0 <= self.ema_end_decay <= 1):
            raise ValueError(
                f"pretrain.ema_decay {self.ema_decay} and ema_end_decay {self.ema_end_decay} "
                "must be in [0, 1]"
            )
        if self.ema_anneal_end_step < 0:
            raise ValueError(
                f"pretrain.ema_anneal_end_step must be >= 0, got {self.ema_anneal_end_step}"
            )
        return self


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


def ema_weight(step: jax.Array, cfg: PretrainConfig) -> jax.Array:  # float32 scalar
    """The student's weight 1 − d(step) in the teacher's update after ``step`` updates,
    where the decay d anneals linearly from ema_decay to ema_end_decay over
    ema_anneal_end_step updates, then stays.

    Formed as (1 − end) + (end − start)·(steps left / anneal length) from constants taken
    in double precision, as the release forms 1 − d: 1 − d computed in float32 near
    d = 0.99999 is off by half a percent (the spacing of float32 there is 6e-8).
    """
    start, end = 1.0 - cfg.ema_decay, 1.0 - cfg.ema_end_decay
    anneal = cfg.ema_anneal_end_step
    if anneal == 0 or start == end:
        return jnp.full(jnp.shape(step), end, jnp.float32)
    steps_left = anneal - jnp.minimum(step, anneal)  # an exact integer
    return end + (start - end) * (steps_left.astype(jnp.float32) / anneal)


def ema_update(teacher, student, weight: jax.Array):
    """teacher + weight·(student − teacher): the teacher's EMA step."""
    return jax.tree.map(lambda t, s: t + weight * (s - t), teacher, student)


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
    by_row = sharding.split("batch")
    # each device picks and places its own rows: left to the partitioner, a gather by
    # indices may all-gather every device's rows and compute it whole on each
    pick = lambda rows, kept: jnp.take_along_axis(rows, kept[..., None], axis=1)
    visible = sharding.per_device(pick, (by_row, by_row), by_row)(patches, kept)  # (B·C, K, D)
    out = encoder.apply(
        enc,
        visible,
        None,
        True,
        method=model_lib.Encoder.contextualize,
        rngs={"dropout": dropout_key},
    )
    grid = grid_shape(spec.shape[1], encoder.cfg)
    full = sharding.per_device(decoder_input, (by_row,) * 3, by_row)(out.tokens[:, 1:], kept, noise)
    predictions = decoder.apply(
        {"params": params["decoder"]}, full.reshape(-1, *grid, full.shape[-1])
    )
    return out.tokens[:, 0], predictions


def teacher_forward(encoder: model_lib.Encoder, teacher_params, spec: jax.Array, top_k: int):
    """Targets (B, L, D) from the EMA teacher over every patch, without gradients."""
    out = encoder.apply({"params": teacher_params}, spec)
    return jax.lax.stop_gradient(teacher_targets(out.layer_results, top_k))


# ---------------------------------------------------------------------------- losses


def masked_std(x: jax.Array, weights: jax.Array) -> jax.Array:
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
        "target_std": masked_std(repeated, weights),
        "pred_std": masked_std(predictions, weights),
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


# ---------------------------------------------------------------------------- fine-tuning

LOSSES = ("bce_per_label", "bce", "ce")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    pooling: str = "cls"  # "cls" (the release) | "mean"
    loss: str = "bce_per_label"
    label_smoothing: float = 0.0  # ce only (the release's BCE ignores it)
    mixup_alpha: float = 0.0  # 0: no mixup
    mixup_prob: float = 0.9
    mask_ratio: float = 0.0  # SpecAugment widths: 128·r bins, target_frames·r frames
    spec_noise_and_roll: bool = False  # SPC-2: + U·U/10 noise, roll by [−10, 10) frames
    init_from: str = ""  # pretraining/fine-tuning workdir or exported encoder; "": random

    def validate(self) -> FinetuneConfig:
        if self.loss not in LOSSES:
            raise ValueError(f"finetune.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"finetune.pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if not (0 <= self.label_smoothing < 1 and 0 <= self.mask_ratio < 1):
            raise ValueError("finetune.label_smoothing and mask_ratio must be in [0, 1)")
        return self


def mixup(key, spec, labels, alpha: float, prob: float):
    """With probability ``prob`` per batch: λ ~ Beta(α, α), x ← λx + (1 − λ)·x[::-1]."""
    if alpha <= 0:
        return spec, labels
    use_key, beta_key = jax.random.split(key)
    lam = jax.random.beta(beta_key, alpha, alpha)
    lam = jnp.where(jax.random.uniform(use_key) < prob, lam, 1.0)
    mix = lambda x: lam * x + (1.0 - lam) * x[::-1]
    return mix(spec), mix(labels)


def band_mask(key, batch: int, size: int, max_width: float) -> jax.Array:  # (B, size) bool
    """One span per row, True inside: width w = U·max_width from a start s uniform in
    [0, size − w], covering ⌊s⌋ ≤ i < ⌊s + w⌋ (torchaudio's iid ``mask_along_axis``)."""
    width_key, start_key = jax.random.split(key)
    width = jax.random.uniform(width_key, (batch, 1)) * max_width
    start = jax.random.uniform(start_key, (batch, 1)) * (size - width)
    lo, hi = jnp.floor(start), jnp.floor(start + width)
    position = jnp.arange(size)[None, :]
    return (position >= lo) & (position < hi)


def spec_augment(key, spec: jax.Array, mask_ratio: float) -> jax.Array:  # (B, T, F)
    """Zeroes one frequency band and one time span per example (0 = the normalised mean)."""
    if mask_ratio <= 0:
        return spec
    batch, frames, bins = spec.shape
    freq_key, time_key = jax.random.split(key)
    freq = band_mask(freq_key, batch, bins, bins * mask_ratio)[:, None, :]
    time = band_mask(time_key, batch, frames, frames * mask_ratio)[:, :, None]
    return jnp.where(freq | time, 0.0, spec)


def noise_and_roll(key, spec: jax.Array) -> jax.Array:
    """SPC-2's augmentation: + U(0,1)·u/10 per element (u one draw per clip), then roll
    each clip along time by an integer in [−10, 10)."""
    noise_key, amp_key, roll_key = jax.random.split(key, 3)
    batch, frames, _ = spec.shape
    amplitude = jax.random.uniform(amp_key, (batch, 1, 1)) / 10
    spec = spec + jax.random.uniform(noise_key, spec.shape) * amplitude
    shift = jax.random.randint(roll_key, (batch, 1), -10, 10)
    source = (jnp.arange(frames)[None, :] - shift) % frames  # (B, T): out[t] = in[t − s]
    return jnp.take_along_axis(spec, source[..., None], axis=1)


def augment(key, spec, labels, cfg: FinetuneConfig):
    """The recipe's augmentation of a training batch: (B, T, F) spectrograms, (B, C) labels."""
    noise_key, mix_key, mask_key = jax.random.split(key, 3)
    if cfg.spec_noise_and_roll:
        spec = noise_and_roll(noise_key, spec)
    spec, labels = mixup(mix_key, spec, labels, cfg.mixup_alpha, cfg.mixup_prob)
    return spec_augment(mask_key, spec, cfg.mask_ratio), labels


def classification_loss(logits: jax.Array, labels: jax.Array, cfg: FinetuneConfig) -> jax.Array:
    """The release's training loss of (B, C) logits against (B, C) soft labels."""
    if cfg.loss == "ce":
        classes = labels.shape[-1]
        smoothed = labels * (1 - cfg.label_smoothing) + cfg.label_smoothing / classes
        return optax.softmax_cross_entropy(logits, smoothed).mean()
    per_entry = optax.sigmoid_binary_cross_entropy(logits, labels)
    if cfg.loss == "bce":
        return per_entry.sum(-1).mean()
    return per_entry.sum() / jnp.maximum(labels.sum(), 1e-6)


def scores_of(logits: jax.Array, cfg: FinetuneConfig) -> jax.Array:
    return jax.nn.softmax(logits) if cfg.loss == "ce" else jax.nn.sigmoid(logits)
