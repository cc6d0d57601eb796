"""Fine-tuning and linear probing: encoder → pooled token → LayerNorm → Linear.

The release's recipe (shared/asda-method.md, release notes §7): layer-wise lr decay
0.65 (embeddings at full lr), drop path 0.1, no clipping, and in the jitted step

    spectrogram ─▶ [SPC-2: noise + ±10-frame roll] ─▶ mixup (p 0.9, Beta(α, α), batch
    flipped) ─▶ SpecAugment (one frequency band ≈ U·128·r, one time span ≈ U·T·r, fill 0)

Losses: ``bce_per_label`` (AudioSet: BCE summed over the batch and classes, divided by
the sum of the mixed labels), ``bce`` (SPC-2: summed over classes, mean over clips),
``ce`` (ESC-50: cross-entropy with label smoothing). Evaluation is augmentation-free
over the whole split (``predict``); scores are sigmoids for BCE and softmaxes for CE.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from asda_jax import checkpoints, config_lib, metrics, optim, sharding, train_lib
from asda_jax import model as model_lib
from asda_jax.data import datasets, pipeline

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


# ---------------------------------------------------------------------------- augmentation


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
    noise_key, mix_key, mask_key = jax.random.split(key, 3)
    if cfg.spec_noise_and_roll:
        spec = noise_and_roll(noise_key, spec)
    spec, labels = mixup(mix_key, spec, labels, cfg.mixup_alpha, cfg.mixup_prob)
    return spec_augment(mask_key, spec, cfg.mask_ratio), labels


# ---------------------------------------------------------------------------- losses


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


# ---------------------------------------------------------------------------- task


class FinetuneTask:
    """Fine-tuning (``task="finetune"``) or a linear probe on a frozen encoder
    (``task="linear_probe"``) of the ``Classifier``."""

    def __init__(self, config):
        self.frozen = config.task == "linear_probe"
        model_cfg = config_lib.model_config(config)
        self.model_cfg = dataclasses.replace(model_cfg, drop_path=0.0) if self.frozen else model_cfg
        self.ft_cfg = finetune_config(config)
        self.data_cfg = config_lib.input_config(config)
        self.eval_cfg = (
            config_lib.input_config(config, "eval_data") if config.get("eval_data") else None
        )
        self.optim_cfg = config_lib.optim_config(config)
        self.num_classes = datasets.load(self.data_cfg.dataset, self.data_cfg.data_dir).num_classes
        self.model = model_lib.Classifier(self.model_cfg, self.num_classes, self.ft_cfg.pooling)

    def init_params(self, rng: jax.Array):
        spec = jnp.zeros((1, self.data_cfg.target_frames, self.model_cfg.num_mel_bins))
        return self.model.init(rng, spec)["params"]

    def optimizer(self, params) -> optax.GradientTransformation:
        tx = optim.make_optimizer(self.optim_cfg, params, depth=self.model_cfg.depth)
        if not self.frozen:
            return tx
        labels = jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if path[0].key == "encoder" else "trained", params
        )
        return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)

    def init_teacher(self, params):
        return None

    def load_initial(self, state: train_lib.TrainState) -> train_lib.TrainState:
        """The encoder from ``finetune.init_from`` (the student of a pretraining run, the
        encoder of a fine-tuning run, or an export), restored onto this run's mesh."""
        if not self.ft_cfg.init_from:
            return state
        current = state.params["encoder"]
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), current
        )
        encoder = checkpoints.restore_params(self.ft_cfg.init_from, target, ("encoder",))
        return state.replace(params={**state.params, "encoder": encoder})

    def logits(self, params, spec, train: bool, dropout_key=None) -> jax.Array:
        rngs = {"dropout": dropout_key} if train else {}
        return self.model.apply({"params": params}, spec, None, train, rngs=rngs)

    def step(self, state, batch: dict, tx):
        spec, _ = pipeline.spectrograms(batch, self.data_cfg)
        key = jax.random.fold_in(state.rng, state.step)
        aug_key, dropout_key = jax.random.split(key)
        spec, labels = augment(aug_key, spec, batch["labels"], self.ft_cfg)

        def loss_fn(params):
            if self.frozen:  # no backward through the encoder
                params = {**params, "encoder": jax.lax.stop_gradient(params["encoder"])}
            logits = self.logits(params, spec, not self.frozen, dropout_key)
            return classification_loss(logits, labels, self.ft_cfg)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": optim.schedule(self.optim_cfg)(state.step),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def check(self, step: int, metrics: dict) -> None:
        train_lib.check_finite(step, metrics)


def finetune_config(config) -> FinetuneConfig:
    block = config.get("finetune") or {}
    cfg = FinetuneConfig(**config_lib.dataclass_fields(FinetuneConfig, block))
    try:
        return cfg.validate()
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e


# ---------------------------------------------------------------------------- evaluation


def predict(task: FinetuneTask, params, data_cfg: pipeline.InputConfig, mesh):
    """(scores (N, C), labels (N, C)) of every clip of ``data_cfg.split``, in order,
    without augmentation, each clip counted once on any number of hosts."""
    cfg = dataclasses.replace(data_cfg, random_crop=False, roll_and_gain=False)

    @jax.jit
    def forward(params, batch):
        spec, _ = pipeline.spectrograms(batch, cfg)
        return scores_of(task.logits(params, spec, train=False), task.ft_cfg)

    scores, labels = [], []
    with sharding.activate(mesh):
        for host_batch in pipeline.make_pipeline(cfg, train=False):
            batch = pipeline.to_global(host_batch, mesh)
            valid = sharding.to_host(batch["valid"])
            scores.append(sharding.to_host(forward(params, batch))[valid])
            labels.append(sharding.to_host(batch["labels"])[valid])
    return np.concatenate(scores), np.concatenate(labels)


def evaluate(task: FinetuneTask, params, data_cfg, mesh) -> dict[str, float]:
    scores, labels = predict(task, params, data_cfg, mesh)
    return metrics.classification_metrics(scores, labels)


def final_evaluation(state, task: FinetuneTask, mesh, workdir) -> dict[str, float]:
    """Metrics of a run's final parameters on its eval split, also in <workdir>/eval.json."""
    results = evaluate(task, state.params, task.eval_cfg, mesh)
    if jax.process_index() == 0:
        (Path(workdir) / "eval.json").write_text(json.dumps(results, indent=2))
    return results


def abstract_params(task: FinetuneTask, mesh, seed: int = 0):
    """ShapeDtypeStructs with this mesh's shardings: a restore target for the params."""
    boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(seed))
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
    return checkpoints.abstract_state(nn.meta.unbox(boxed), shardings)
