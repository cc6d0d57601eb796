"""Fine-tuning on AudioSet-20K (balanced_train), evaluated by mAP on AudioSet eval.

    python launch/train.py --config=configs/finetune_as20k.py:mesh=gpu,init_from=/ckpt/as2m \
        --workdir=/ckpt/as20k

Arguments: mesh, model, data_dir, init_from (a pretraining workdir or an exported
encoder), task=linear_probe for a frozen encoder. Recipe: asda_jax/recipes.py.
"""

from asda_jax import recipes


def get_config(arg=None):
    return recipes.finetune(
        arg,
        dataset="audioset",
        train_split="balanced_train",
        eval_split="eval",
        target_frames=1024,
        norm="audioset",
        batch_size=32,
        lr=5e-5,
        steps=60_000,
        warmup=6_000,
        recipe=dict(loss="bce_per_label", mixup_alpha=0.8, mask_ratio=0.2),
    )
