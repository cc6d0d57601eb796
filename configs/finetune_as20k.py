"""Fine-tuning on AudioSet-20K (balanced_train), evaluated by mAP on AudioSet eval.

    python launch/train.py --config=configs/finetune_as20k.py:mesh=gpu,init_from=/ckpt/as2m \
        --workdir=/ckpt/as20k

Arguments: mesh, model, data_dir, init_from (a pretraining workdir or an exported
encoder), task=linear_probe for a frozen encoder. Recipe: asda_jax/recipes.py.
"""

from asda_jax import recipes


def get_config(arg=None):
    return recipes.finetuning_run(recipes.RECIPES["as20k"], arg)
