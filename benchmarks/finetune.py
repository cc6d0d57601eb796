"""Fine-tuning and evaluation throughput (clips/s) at the demo and base sizes.

    python -m benchmarks.finetune [--steps 5]

The fine-tuning step of configs/finetune_demo.py's recipe (SpecAugment, drop path,
layer-decay AdamW; float32 on CPU) and the augmentation-free evaluation forward, on
random normalised spectrograms of the recipe's length: demo (192 wide, 4 blocks,
1.28 s clips, batch 32) and base (the release's ViT-B, 10.24 s clips as AS-20K, batch 4).
Medians over --steps calls after one compiling call; the input pipeline is excluded
(benchmarks/input_pipeline.py measures it).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from asda_jax import config_lib, finetuning, hardware, sharding, train_state
from asda_jax.data import datasets
from benchmarks import common

SIZES = {"demo": (128, 32), "base": (1024, 4)}  # preset: (frames, batch)


def median_seconds(fn, steps: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def rates(preset: str, steps: int) -> tuple[float, float]:
    frames, batch_size = SIZES[preset]
    config = config_lib.load_file("configs/finetune_demo.py", f"model={preset},init_from=")
    config.data.target_frames = frames
    config.data.batch_size = batch_size
    task = finetuning.FinetuneTask(config_lib.read(config, hardware.HOST))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    plan = train_state.plan_state(task, mesh, jax.random.PRNGKey(0))
    state = train_state.create_state(plan, mesh, jax.random.PRNGKey(0))
    spec = jax.random.normal(jax.random.key(1), (batch_size, frames, 128))
    labels = jax.nn.one_hot(np.arange(batch_size) % task.num_classes, task.num_classes)
    batch = {"spectrogram": spec, "frames": np.full(batch_size, frames), "labels": labels}
    with sharding.activate(mesh):
        holder = [state]
        step = train_state.jit_step(task, plan, mesh)
        forward = jax.jit(lambda p, s: task.logits(p, s, train=False))

        def train_once():
            holder[0], metrics = step(holder[0], batch)
            return metrics["loss"]

        train_s = median_seconds(train_once, steps)
        eval_s = median_seconds(lambda: forward(holder[0].params, spec), steps)
    return batch_size / train_s, batch_size / eval_s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {common.machine()}\nversions: {common.versions(('jax', 'flax'))}")
    datasets.prepare("synthetic", "data")  # the recipe reads its class count
    rows = []
    for preset, (frames, batch) in SIZES.items():
        train_rate, eval_rate = rates(preset, args.steps)
        rows.append([preset, f"{frames}", f"{batch}", f"{train_rate:.1f}", f"{eval_rate:.1f}"])
    common.print_table(
        f"Fine-tuning throughput, float32, median of {args.steps} calls",
        ["model", "frames", "batch", "fine-tune clips/s", "evaluation clips/s"],
        rows,
    )


if __name__ == "__main__":
    main()
