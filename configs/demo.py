"""The embedded default: pretrain a small model on the synthetic dataset, on a laptop CPU.

    python launch/train.py --config=configs/demo.py --workdir=workdirs/demo

Prepares the synthetic dataset if needed (seconds), pretrains for a few minutes on two
CPU cores, then prints the linear-probe accuracy of the pretrained encoder next to a
randomly initialised one. The objective is the release's; the sizes are scaled down:
a 192-wide, 4-block encoder, 1.3 s clips (128 frames → 8×8 patches), 3×3 mask blocks
(5×5 blocks do not fit an 8×8 grid at 80 % masking), 4 clones, and a faster EMA.
"""

import ml_collections

from asda_jax import audio

STEPS = 300


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.task = "pretrain"
    config.model = dict(preset="demo", dtype="float32", attention_impl="auto")
    config.mask = dict(mask_prob=0.8, mask_prob_adjust=0.07, mask_length=3, clone_batch=4)
    config.pretrain = dict(
        average_top_k_layers=4,
        mask_noise_std=0.01,
        cls_loss=0.5,
        utterance_rows=192,
        ema_decay=0.99,
        ema_end_decay=0.999,
        ema_anneal_end_step=STEPS,
        min_target_var=0.1,
        min_pred_var=0.01,
        collapse_check_after=100,
    )
    config.data = dict(
        dataset="synthetic",
        data_dir="data",
        split="train",
        batch_size=32,
        target_frames=128,
        norm=audio.NORM_STATS["audioset"],
        fbank_on="host",
        seed=0,
        threads=2,
        prefetch=8,
    )
    config.eval_data = None
    config.optim = dict(lr=1e-3, warmup_steps=30, total_steps=STEPS, clip_norm=4.0)
    config.num_train_steps = STEPS
    config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    config.mesh_dcn = None
    config.num_processes = 1
    config.seed = 0
    config.log_every = 10
    config.checkpoint_every = 100
    config.keep_checkpoints = 3
    config.profile_steps = 0
    config.probe = dict(train_split="train", test_split="test")
    return config
