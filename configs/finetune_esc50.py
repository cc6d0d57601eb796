"""Fine-tuning on ESC-50, one fold held out (``fold=k``, default 1), accuracy on it.

    python launch/train.py --config=configs/finetune_esc50.py:mesh=gpu,fold=1,init_from=... \
        --workdir=/ckpt/esc50/fold1
    python launch/esc50_folds.py --config=configs/finetune_esc50.py:mesh=gpu,init_from=... \
        --workdir=/ckpt/esc50          # all 5 folds, each fold's accuracy and mean ± std

Cross-entropy with label smoothing 0.1, no mixup, SpecAugment ratio 0.4, 5.12 s crops.
"""

import dataclasses

from asda_jax import config_lib, recipes


def get_config(arg=None):
    args = config_lib.parse_arg(arg)
    train_split, eval_split = recipes.esc50_splits(int(args.pop("fold", 1)))
    recipe = dataclasses.replace(
        recipes.RECIPES["esc50"], train_split=train_split, eval_split=eval_split
    )
    return recipes.finetuning_run(recipe, **args)
