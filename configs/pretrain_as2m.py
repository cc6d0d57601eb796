"""Self-supervised pretraining on AudioSet-2M with the release's hyperparameters.

    python launch/train.py --config=configs/pretrain_as2m.py:mesh=v4-32 --workdir=...

Arguments (after the colon): ``mesh`` (a preset of config_lib.MESH_PRESETS: cpu, gpu,
gpu_fsdp, v4-8, v4-32, v5e-8, v5e-32, v5e-256, v5p-128, 2x-v5e-256), ``model`` (base,
small, tiny), ``data_dir``. Everything else is overridable as --config.block.field=...

The recipe (shared/asda-method.md): 48 clips per update × 16 clones, inverse block
masks keeping 102 of 512 patches, EMA teacher 0.9998 → 0.99999 over 100k updates,
AdamW (0.9, 0.95), wd 0.05, lr 5e-4, warmup 106 666, cosine over 800k updates, clip 4.
Presets with more hosts than 48 divides use 64 or 128 clips (noted in the preset).
"""

import ml_collections

from asda_jax import audio, config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg)
    preset = config_lib.mesh_preset(args.get("mesh", "gpu"))
    config = ml_collections.ConfigDict()
    config.task = "pretrain"
    config.model = dict(
        preset=args.get("model", "base"),
        dtype=preset.dtype,
        attention_impl="auto",
        remat_policy="none",
    )
    config.mask = dict(mask_prob=0.8, mask_prob_adjust=0.07, mask_length=5, clone_batch=16)
    config.pretrain = dict(
        average_top_k_layers=12,
        mask_noise_std=0.01,
        cls_loss=0.5,
        utterance_rows=192,
        ema_decay=0.9998,
        ema_end_decay=0.99999,
        ema_anneal_end_step=100_000,
        min_target_var=0.1,
        min_pred_var=0.01,
        collapse_check_after=5_000,
    )
    config.data = dict(
        dataset="audioset",
        data_dir=args.get("data_dir", "data"),
        split="balanced_train+unbalanced_train",
        batch_size=preset.batch_size or 48,
        target_frames=1024,
        norm=audio.NORM_STATS["audioset"],
        fbank_on=preset.fbank_on,
        random_crop=False,
        roll_and_gain=False,
        seed=1,
        threads=16,
        prefetch=64,
    )
    config.eval_data = None
    config.optim = dict(
        lr=5e-4,
        warmup_steps=106_666,
        total_steps=800_000,
        min_lr=0.0,
        weight_decay=0.05,
        decay_everything=False,
        clip_norm=4.0,
    )
    config.num_train_steps = 800_000
    config.mesh = preset.mesh
    config.mesh_dcn = preset.dcn
    config.num_processes = preset.processes
    config.seed = 1
    config.log_every = 100
    config.checkpoint_every = 10_000
    config.keep_checkpoints = 10
    config.profile_steps = 0
    config.probe = None
    return config
