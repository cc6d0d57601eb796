"""Fine-tuning on AudioSet-2M with balanced (weighted) sampling, mAP on AudioSet eval.

    python launch/train.py --config=configs/finetune_as2m.py:mesh=v4-32,init_from=/ckpt/as2m \
        --workdir=/ckpt/as2m-ft

Each epoch draws 200 000 clips without replacement, with probability ∝ the per-clip
weights the audioset builder writes. Arguments and recipe: see finetune_as20k.py.
"""

from asda_jax import recipes


def get_config(arg=None):
    return recipes.finetune(
        arg,
        dataset="audioset",
        train_split="balanced_train+unbalanced_train",
        eval_split="eval",
        target_frames=1024,
        norm="audioset",
        batch_size=48,
        lr=5e-5,
        steps=600_000,
        warmup=60_000,
        weighted_sampling=True,
        recipe=dict(loss="bce_per_label", mixup_alpha=0.8, mask_ratio=0.2),
    )
