"""Fine-tuning on AudioSet-2M with balanced (weighted) sampling, mAP on AudioSet eval.

    python launch/train.py --config=configs/finetune_as2m.py:mesh=v4-32,init_from=/ckpt/as2m \
        --workdir=/ckpt/as2m-ft

Each epoch draws 200 000 clips without replacement, with probability ∝ the per-clip
weights the audioset builder writes. Arguments and recipe: see finetune_as20k.py.
"""

from asda_jax import recipes


def get_config(arg=None):
    return recipes.finetuning_run(recipes.RECIPES["as2m"], arg)
