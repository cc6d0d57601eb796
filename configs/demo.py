"""The embedded default: pretrain a small model on the synthetic dataset, on a laptop CPU.

    python launch/train.py --config=configs/demo.py --workdir=workdirs/demo

Prepares the synthetic dataset if needed (seconds), pretrains for a few minutes on two
CPU cores, then prints the linear-probe accuracy of the pretrained encoder next to a
randomly initialised one. The objective is the release's; the sizes are scaled down:
a 192-wide, 4-block encoder, 1.3 s clips (128 frames → 8×8 patches), 3×3 mask blocks
(5×5 blocks do not fit an 8×8 grid at 80 % masking), 4 clones, and a faster EMA.
"""

from asda_jax import config_lib

STEPS = 300


def get_config(arg=None):
    del arg
    config = config_lib.run_config("pretrain", model="demo", mesh="cpu", batch_size=32)
    config.mask.update(mask_length=3, clone_batch=4)
    config.pretrain.update(
        average_top_k_layers=4,
        ema_decay=0.99,
        ema_end_decay=0.999,
        ema_anneal_end_step=STEPS,
        collapse_check_after=100,
    )
    config.data.update(dataset="synthetic", target_frames=128, threads=2)
    config.optim.update(lr=1e-3, warmup_steps=30)
    config.num_train_steps = STEPS
    config.log_every = 10
    config.checkpoint_every = 100
    config.probe = dict(train_split="train", test_split="test")
    return config
