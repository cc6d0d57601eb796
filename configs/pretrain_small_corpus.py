"""Self-supervised pretraining on a small folder of real recordings (hours, not the
5 800 h of AudioSet-2M), on a CPU or one accelerator.

    python launch/train.py \
        --config=configs/pretrain_small_corpus.py:source=/data/recordings,data_dir=data \
        --workdir=workdirs/small

Arguments (after the colon): ``source``, ``data_dir``, ``steps`` (default 3 000),
``model`` (default demo), ``mesh`` (default cpu), ``init_from`` (an export to continue
from: its architecture replaces ``model``, its input normalisation the default, and
student and teacher start from its encoder: ``config_lib.continue_from``). The folder is
read as
configs/pretrain_folder.py reads it (every file that decodes, cut into 10.255 s
segments). What differs from the release's AS-2M recipe, and why:

- ``model=demo`` (192 wide, 4 blocks): a base model (86 M parameters) does not take
  enough updates in a CPU-hour to leave its random init; at this size 3 000 updates
  of 32 clips take about an hour on two cores.
- ``target_frames=128`` (1.28 s crops, 8×8 patches) and ``random_crop``: each 10 s
  segment gives a different crop every epoch, so a corpus of ~15 h is not memorised
  in the few epochs the run makes; the cost per update falls 8× with the tokens.
- ``mask_length=3``: 5×5 blocks do not fit an 8×8 grid at 80 % masking.
- ``clone_batch=4`` (release 16): four masks per clip keep the teacher's pass shared
  while the student's cost stays within the hour.
- ``average_top_k_layers=4``: the targets average every block of the 4.
- ``lr=1e-3``, warmup 10 % of the run: a small model and a short run; the release's
  5e-4 with a 13 % warmup of 800 k updates assumes 800 k updates.
- EMA 0.998 → 0.9999 over the run (release 0.9998 → 0.99999 over 100 k updates): the
  teacher must follow the student within a run of thousands of updates; at 0.9998
  its time constant (5 000 updates) would exceed the run.
- ``collapse_check_after`` at a tenth of the run instead of 5 000 updates.
- checkpoints every sixth of the run, all kept: the probe curve reads them.
"""

from asda_jax import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg)
    steps = int(args.get("steps", 3000))
    config = config_lib.run_config(
        "pretrain", model=args.get("model", "demo"), mesh=args.get("mesh", "cpu"), batch_size=32
    )
    config.data.update(
        dataset="unlabelled_folder",
        data_dir=args.get("data_dir", "data"),
        source=args.get("source", ""),
        split="train",
        target_frames=128,
        random_crop=True,
        threads=2,
        seed=1,
    )
    config.mask.update(mask_length=3, clone_batch=4)
    config.pretrain.update(
        average_top_k_layers=4,
        ema_decay=0.998,
        ema_end_decay=0.9999,
        ema_anneal_end_step=steps,
        collapse_check_after=max(1, steps // 10),
    )
    config.optim.update(lr=1e-3, warmup_steps=max(1, steps // 10))
    config.num_train_steps = steps
    config.seed = 1
    config.log_every = max(1, min(50, steps // 20))
    config.checkpoint_every = max(1, steps // 6)
    config.keep_checkpoints = 7
    config_lib.continue_from(config, args.get("init_from", ""))
    return config
