"""The release's fine-tuning recipes, one row per task (configs/finetune_*.py use them).

| task   | frames | batch | lr   | updates (warmup) | mixup α | mask_ratio | loss          |
|--------|--------|-------|------|------------------|---------|------------|---------------|
| AS-20K | 1024   | 32    | 5e-5 | 60k (6k)         | 0.8     | 0.2        | bce_per_label |
| AS-2M  | 1024   | 48    | 5e-5 | 600k (60k)       | 0.8     | 0.2        | bce_per_label |
| ESC-50 | 512    | 48    | 5e-5 | 4k (400)         | 0       | 0.4        | ce, smooth 0.1|
| SPC-2  | 128    | 256   | 2e-4 | 80k (8k)         | 0.8     | 0.2        | bce           |

Common (docs/method.md): CLS pooling, layer decay 0.65 (embeddings at full lr),
drop path 0.1, AdamW (0.9, 0.95), wd 0.05, min lr 1e-6, no clipping, roll-and-gain on
every task. SPC-2 trains through the release's BCE branch, where its label smoothing
has no effect, so it is 0 here; AS-2M draws each epoch by the per-clip weights.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from asda_jax import audio, config_lib

ESC50_FOLDS = 5


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One task's row of the release's fine-tuning table."""

    dataset: str
    train_split: str
    eval_split: str
    target_frames: int
    norm: str  # a key of audio.NORM_STATS
    batch_size: int
    lr: float
    steps: int
    warmup: int
    finetune: dict  # FinetuneConfig fields that differ from its defaults
    seed: int = 1
    weighted_sampling: bool = False


def esc50_splits(fold: int) -> tuple[str, str]:
    """(training split, evaluation split) of ESC-50 with ``fold`` held out."""
    if not 1 <= fold <= ESC50_FOLDS:
        raise config_lib.ConfigError(f"ESC-50 fold must be in 1..{ESC50_FOLDS}, got {fold}")
    train = "+".join(f"fold{k}" for k in range(1, ESC50_FOLDS + 1) if k != fold)
    return train, f"fold{fold}"


AUDIOSET_LOSS = dict(loss="bce_per_label", mixup_alpha=0.8, mask_ratio=0.2)
AUDIOSET = dict(dataset="audioset", eval_split="eval", target_frames=1024, norm="audioset")
RECIPES = {
    "as20k": Recipe(
        **AUDIOSET, train_split="balanced_train", batch_size=32, lr=5e-5, steps=60_000,
        warmup=6_000, finetune=AUDIOSET_LOSS,
    ),
    "as2m": Recipe(
        **AUDIOSET, train_split="balanced_train+unbalanced_train", batch_size=48, lr=5e-5,
        steps=600_000, warmup=60_000, finetune=AUDIOSET_LOSS, weighted_sampling=True,
    ),
    "esc50": Recipe(
        dataset="esc50", train_split=esc50_splits(1)[0], eval_split=esc50_splits(1)[1],
        target_frames=512, norm="esc50", batch_size=48, lr=5e-5, steps=4_000, warmup=400,
        finetune=dict(loss="ce", label_smoothing=0.1, mask_ratio=0.4),
    ),
    "spcv2": Recipe(
        dataset="speech_commands_v2", train_split="train", eval_split="test",
        target_frames=128, norm="spcv2", batch_size=256, lr=2e-4, steps=80_000, warmup=8_000,
        finetune=dict(loss="bce", mixup_alpha=0.8, mask_ratio=0.2, spec_noise_and_roll=True),
        seed=42,
    ),
}  # fmt: skip


def finetuning_run(recipe: Recipe, arg: str | None = None, **args) -> ml_collections.ConfigDict:
    """The config of a fine-tuning run of ``recipe``. Arguments (get_config's ``arg``, or
    keywords, which win): ``mesh`` (a mesh preset, default gpu), ``model`` (a model
    preset), ``data_dir``, ``init_from`` (a pretraining workdir or an export; empty:
    random init), ``task=linear_probe`` (a frozen encoder)."""
    args = config_lib.parse_arg(arg) | args
    config = config_lib.run_config(
        args.get("task", "finetune"),
        model=args.get("model", "base"),
        mesh=args.get("mesh", "gpu"),
        batch_size=recipe.batch_size,
    )
    config.model.drop_path = 0.1
    config.finetune.update(init_from=args.get("init_from", ""), **recipe.finetune)
    config.data.update(
        dataset=recipe.dataset,
        data_dir=args.get("data_dir", "data"),
        split=recipe.train_split,
        target_frames=recipe.target_frames,
        norm=audio.NORM_STATS[recipe.norm],
        roll_and_gain=True,
        weighted_sampling=recipe.weighted_sampling,
        seed=recipe.seed,
        threads=16,
        prefetch=64,
    )
    config.eval_data = config.data.copy_and_resolve_references()
    config.eval_data.update(split=recipe.eval_split, roll_and_gain=False, weighted_sampling=False)
    config.optim.update(
        lr=recipe.lr, warmup_steps=recipe.warmup, min_lr=1e-6, clip_norm=0.0, layer_decay=0.65
    )
    config.num_train_steps = recipe.steps
    config.seed = recipe.seed
    config.checkpoint_every = max(recipe.steps // 20, 1)
    return config
