"""Self-supervised pretraining on AudioSet-2M with the release's hyperparameters.

    python launch/train.py --config=configs/pretrain_as2m.py:mesh=v4-32 --workdir=...

Arguments (after the colon): ``mesh`` (a preset of hardware.MESH_PRESETS: cpu, gpu,
gpu_fsdp, v4-8, v4-32, v5e-8, v5e-32, v5e-256, v5p-128, 2x-v5e-256, v6e-8, v6e-256,
tpu7x-8, tpu7x-128, v5e-1, v6e-1), ``model`` (base,
small, tiny), ``data_dir``. Everything else is overridable as --config.block.field=...

The recipe (docs/method.md) is the defaults of the config blocks: 48 clips per
update × 16 clones, inverse block masks keeping 102 of 512 patches, EMA teacher
0.9998 → 0.99999 over 100k updates, AdamW (0.9, 0.95), wd 0.05, lr 5e-4, warmup
106 666, cosine over the run's 800k updates, clip 4. A TPU preset whose chips do not
divide 48 clips rounds the batch up to whole clips per chip (v5e-32 and v5p-128: 64,
v5e-256: 256, 2x-v5e-256: 512; ``hardware.MeshPreset.batch_for``), the learning rate
unchanged: scale ``--config.optim.lr`` with the batch if you want the linear rule.
``v5e-1`` (one 16 GiB chip) rematerialises every block (``MeshPreset.remat``).
"""

from asda_jax import config_lib


def get_config(arg=None):
    args = config_lib.parse_arg(arg)
    config = config_lib.run_config(
        "pretrain", model=args.get("model", "base"), mesh=args.get("mesh", "gpu"), batch_size=48
    )
    config.data.update(
        dataset="audioset",
        data_dir=args.get("data_dir", "data"),
        split="balanced_train+unbalanced_train",
        seed=1,
        threads=16,
        prefetch=64,
    )
    config.num_train_steps = 800_000
    config.seed = 1
    config.checkpoint_every = 10_000
    config.keep_checkpoints = 10
    return config
