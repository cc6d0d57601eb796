"""The fine-tuning recipes of the release as ml_collections configs (configs/finetune_*.py).

One builder, one row per task of the release's table (shared/asda-method.md):

| task   | frames | batch | lr   | updates (warmup) | mixup α | mask_ratio | loss          |
|--------|--------|-------|------|------------------|---------|------------|---------------|
| AS-20K | 1024   | 32    | 5e-5 | 60k (6k)         | 0.8     | 0.2        | bce_per_label |
| AS-2M  | 1024   | 48    | 5e-5 | 600k (60k)       | 0.8     | 0.2        | bce_per_label |
| ESC-50 | 512    | 48    | 5e-5 | 4k (400)         | 0       | 0.4        | ce, smooth 0.1|
| SPC-2  | 128    | 256   | 2e-4 | 80k (8k)         | 0.8     | 0.2        | bce           |

Common: CLS pooling, layer decay 0.65 (embeddings at full lr), drop path 0.1, AdamW
(0.9, 0.95), wd 0.05, min lr 1e-6, no clipping, roll-and-gain on every task.
"""

from __future__ import annotations

import ml_collections

from asda_jax import audio, config_lib

ESC50_FOLDS = 5


def esc50_splits(fold: int) -> tuple[str, str]:
    """(training split, evaluation split) of ESC-50 with ``fold`` held out."""
    if not 1 <= fold <= ESC50_FOLDS:
        raise config_lib.ConfigError(f"ESC-50 fold must be in 1..{ESC50_FOLDS}, got {fold}")
    train = "+".join(f"fold{k}" for k in range(1, ESC50_FOLDS + 1) if k != fold)
    return train, f"fold{fold}"


def format_arg(args: dict[str, str]) -> str:
    """The inverse of config_lib.parse_arg."""
    return ",".join(f"{k}={v}" for k, v in args.items())


def finetune(
    arg: str | None,
    *,
    dataset: str,
    train_split: str,
    eval_split: str,
    target_frames: int,
    norm: str,
    batch_size: int,
    lr: float,
    steps: int,
    warmup: int,
    recipe: dict,
    seed: int = 1,
    weighted_sampling: bool = False,
) -> ml_collections.ConfigDict:
    """A fine-tuning config; ``arg`` as in pretrain_as2m.py plus ``init_from`` and
    ``task`` (``linear_probe`` freezes the encoder)."""
    args = config_lib.parse_arg(arg)
    preset = config_lib.mesh_preset(args.get("mesh", "gpu"))
    data = dict(
        dataset=dataset,
        data_dir=args.get("data_dir", "data"),
        split=train_split,
        batch_size=preset.batch_size or batch_size,
        target_frames=target_frames,
        norm=audio.NORM_STATS[norm],
        fbank_on=preset.fbank_on,
        random_crop=False,
        roll_and_gain=True,
        weighted_sampling=weighted_sampling,
        seed=seed,
        threads=16,
        prefetch=64,
    )
    config = ml_collections.ConfigDict()
    config.task = args.get("task", "finetune")
    config.model = dict(
        preset=args.get("model", "base"),
        dtype=preset.dtype,
        attention_impl="auto",
        remat_policy="none",
        drop_path=0.1,
    )
    config.finetune = dict(
        pooling="cls", init_from=args.get("init_from", ""), mixup_prob=0.9, **recipe
    )
    config.data = data
    config.eval_data = dict(data, split=eval_split, roll_and_gain=False, weighted_sampling=False)
    config.optim = dict(
        lr=lr,
        warmup_steps=warmup,
        total_steps=steps,
        min_lr=1e-6,
        weight_decay=0.05,
        clip_norm=0.0,
        layer_decay=0.65,
    )
    config.num_train_steps = steps
    config.mesh = preset.mesh
    config.mesh_dcn = preset.dcn
    config.num_processes = preset.processes
    config.seed = seed
    config.log_every = 100
    config.checkpoint_every = max(steps // 20, 1)
    config.keep_checkpoints = 3
    config.profile_steps = 0
    config.probe = None
    return config
