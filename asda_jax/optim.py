"""The optimiser: AdamW with warmup + cosine, clipping, decay mask, layer-wise lr decay."""

from __future__ import annotations

import dataclasses
import re

import jax
import optax

# Leaves the release holds as 1-D tensors whatever shape ours take (the attention's
# LayerNorm scale is (H, Dh) here, (D,) there; qk's bias is (4, H, Dh)).
NO_DECAY_LEAVES = ("bias", "scale")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    warmup_steps: int = 106_666
    # The schedule's length, warmup included. None: the run's num_train_steps, resolved
    # by config_lib.optim_config (the run length is the one source of both).
    decay_steps: int | None = None
    min_lr: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.05
    # Weight decay follows the release's stated rule (``decays``): biases, norms' scales
    # and other 1-D parameters are exempt, the CLS token and every kernel decay. fairseq's
    # composite optimiser drops that rule and the release decays everything: True
    # reproduces the release as it ran.
    decay_everything: bool = False
    # Further parameters exempt from decay, by a name in their path (e.g. "cls_token",
    # which MAE and BEiT exempt); empty in every shipped config.
    no_decay: tuple[str, ...] = ()
    clip_norm: float = 4.0  # 0: no clipping (the release's fine-tuning)
    layer_decay: float = 1.0  # < 1: layer-wise lr decay for fine-tuning

    def validate(self) -> OptimConfig:
        if self.decay_steps is None:
            raise ValueError("optim.decay_steps is unresolved: build it with config_lib")
        if not 0 <= self.warmup_steps <= self.decay_steps:
            raise ValueError(
                f"optim.warmup_steps {self.warmup_steps} must be in [0, {self.decay_steps}]: "
                "the schedule is num_train_steps long (or optim.decay_steps, when set)"
            )
        if self.lr <= 0 or not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.lr must be > 0 and layer_decay in (0, 1], got {self}")
        return self


def schedule(cfg: OptimConfig, scale: float = 1.0) -> optax.Schedule:
    """fairseq's cosine schedule for a peak of lr·scale: linear warmup from the floor
    min(min_lr, peak) to the peak, then cosine down to the floor (a group whose scaled
    peak is below min_lr keeps a constant rate, as fairseq's per-group schedulers do)."""
    peak = cfg.lr * scale
    floor = min(cfg.min_lr, peak)
    return optax.warmup_cosine_decay_schedule(
        init_value=floor,
        peak_value=peak,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.decay_steps, cfg.warmup_steps + 1),
        end_value=floor,
    )


def path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decays(path, leaf, no_decay: tuple[str, ...] = ()) -> bool:
    """The release's rule, stated by both its models: a parameter decays unless it is
    1-D or a bias (here: a ``bias`` or norm ``scale`` leaf, whatever its shape), or one
    of its path's names is in ``no_decay``."""
    names = path_names(path)
    exempt = names[-1] in NO_DECAY_LEAVES or len(leaf.shape) == 1
    return not (exempt or set(names) & set(no_decay))


def decay_mask(params, cfg: OptimConfig):
    """True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: cfg.decay_everything or decays(path, leaf, cfg.no_decay), params
    )


def exempt_from_decay(params, cfg: OptimConfig) -> list[str]:
    """The '/'-joined paths of every parameter weight decay leaves alone."""
    flags = jax.tree_util.tree_leaves_with_path(decay_mask(params, cfg))
    return ["/".join(path_names(path)) for path, decayed in flags if not decayed]


def layer_index(path, depth: int) -> int:
    """Layer id for lr decay: 0 for the embeddings (patch, CLS, context norm),
    1 + i for block i, depth + 1 for everything after the blocks (head, fc_norm)."""
    for name in path_names(path):
        match = re.fullmatch(r"blocks_(\d+)", name)
        if match:
            return int(match.group(1)) + 1
    names = set(path_names(path))
    if names & {"patch_embed", "cls_token", "context_norm"}:
        return 0
    return depth + 1


def lr_scales(params, depth: int, layer_decay: float, embeddings_at_full_lr: bool = True):
    """Per-parameter lr multipliers: layer_decay^(depth + 1 − layer).

    The release (data2vec 2.0) leaves the embeddings at scale 1.0 while block 0 gets
    layer_decay^depth: ``embeddings_at_full_lr`` keeps that; False gives the usual
    BEiT rule (embeddings at layer_decay^(depth + 1)).
    """

    def scale(path, _):
        layer = layer_index(path, depth)
        if layer == 0 and embeddings_at_full_lr:
            return 1.0
        return layer_decay ** (depth + 1 - layer)

    return jax.tree_util.tree_map_with_path(scale, params)


def adamw(cfg: OptimConfig, learning_rate) -> optax.GradientTransformation:
    # A callable mask: inside multi_transform each group sees a partly masked tree.
    return optax.adamw(
        learning_rate,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda params: decay_mask(params, cfg),
    )


def make_optimizer(
    cfg: OptimConfig, params, *, depth: int = 0, embeddings_at_full_lr: bool = True
) -> optax.GradientTransformation:
    """Clip → AdamW, one schedule per distinct layer-decay multiplier."""
    cfg.validate()
    names = {
        name for path, _ in jax.tree_util.tree_leaves_with_path(params) for name in path_names(path)
    }
    unknown = sorted(set(cfg.no_decay) - names)
    if unknown:
        raise ValueError(f"optim.no_decay names no parameter of this model: {unknown}")
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    if cfg.layer_decay >= 1.0:
        return optax.chain(*chain, adamw(cfg, schedule(cfg)))
    scales = lr_scales(params, depth, cfg.layer_decay, embeddings_at_full_lr)
    labels = jax.tree.map(lambda s: f"lr×{s:.6g}", scales)
    scale_of = dict(zip(jax.tree.leaves(labels), jax.tree.leaves(scales), strict=True))
    groups = {label: adamw(cfg, schedule(cfg, s)) for label, s in scale_of.items()}
    return optax.chain(*chain, optax.multi_transform(groups, labels))
