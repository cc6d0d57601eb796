"""Self-supervised pretraining on a folder of your own recordings, without labels.

    python launch/train.py \
        --config=configs/pretrain_folder.py:source=/data/field_recordings,data_dir=data \
        --workdir=workdirs/field

Arguments (after the colon): ``source`` (the folder: any depth, any of the formats
read_audio takes, any length), ``data_dir`` (where the prepared dataset goes),
``mesh`` (a preset of hardware.MESH_PRESETS, default gpu), ``model`` (base, small,
demo, tiny), ``steps`` (updates, default 100 000; the schedule follows), ``init_from``
(an export to continue from, instead of random init: ``config_lib.continue_from``).

The first run prepares the ``unlabelled_folder`` dataset from ``source`` (each
recording cut into 10.255 s segments, one record each, read by seeking; unreadable
files skipped and counted) and later runs reuse it; to re-scan the folder, remove
``<data_dir>/unlabelled_folder``. The recipe is the release's pretraining one
(pretrain_as2m.py's), with its warmup scaled to the run's length.
"""

from asda_jax import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg)
    config = config_lib.run_config(
        "pretrain", model=args.get("model", "base"), mesh=args.get("mesh", "gpu"), batch_size=48
    )
    steps = int(args.get("steps", 100_000))
    config.data.update(
        dataset="unlabelled_folder",
        data_dir=args.get("data_dir", "data"),
        source=args.get("source", ""),
        split="train",
        seed=1,
    )
    config.optim.warmup_steps = max(1, round(steps * 106_666 / 800_000))
    config.num_train_steps = steps
    config.seed = 1
    config.checkpoint_every = max(1, min(10_000, steps // 10))
    config_lib.continue_from(config, args.get("init_from", ""))
    return config
