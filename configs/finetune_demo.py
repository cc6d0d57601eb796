"""Fine-tunes the demo's pretrained encoder on the synthetic dataset (CPU, a minute).

    python launch/train.py --config=configs/finetune_demo.py --workdir=workdirs/demo-ft
    python launch/train.py --config=configs/finetune_demo.py:init_from= \
        --workdir=workdirs/demo-ft-random          # the same budget from random init

``init_from`` defaults to the demo's workdir (run ``make demo`` first). The recipe is
ESC-50's (cross-entropy with label smoothing, SpecAugment, layer decay 0.65, drop
path 0.1) at the demo's sizes, with a higher lr for a short budget.
"""

from asda_jax import config_lib, recipes

STEPS = 120
DEMO = recipes.Recipe(
    dataset="synthetic",
    train_split="train",
    eval_split="test",
    target_frames=128,
    norm="audioset",
    batch_size=32,
    lr=5e-4,
    steps=STEPS,
    warmup=12,
    finetune=dict(loss="ce", label_smoothing=0.1, mask_ratio=0.2),
    seed=0,
)


def get_config(arg=None):
    args = {"mesh": "cpu", "model": "demo", "init_from": "workdirs/demo"}
    config = recipes.finetuning_run(DEMO, **(args | config_lib.parse_arg(arg)))
    config.data.update(threads=2, prefetch=8)
    config.eval_data.update(threads=2, prefetch=8)
    config.log_every = 10
    config.checkpoint_every = STEPS
    return config
