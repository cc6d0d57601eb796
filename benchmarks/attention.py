"""Differential vs plain attention: forward+backward time and peak memory per backend.

    python -m benchmarks.attention [--repeats 20] [--dtype float32]

Shapes are the pretraining ones at 12 heads × 64: the teacher (clips × 513 tokens)
and the student (16 clones × 103 tokens). Plain and differential attention of each row
are timed in alternating rounds in this process (medians); ratios are to plain
attention on the same backend and on the CPU's (``xla``) backend. ``reference`` is the
formula differentiated by JAX, the tests' oracle. Pallas kernels only run interpreted
off TPU, so they are timed only on a TPU.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from asda_jax import attention as attn_lib
from asda_jax import hardware
from asda_jax import model as model_lib
from benchmarks import common

HEADS, HEAD_DIM = 12, 64
SHAPES = {"teacher 2×513": (2, 513), "student 16×103": (16, 103)}
CHIP = hardware.of_devices(jax.devices())  # what the timed programs run on
FUSED = {"gpu": ["cudnn"], "tpu": ["pallas_splash"]}  # the chip's fused backends of both forms


def backends_here() -> list[str]:
    """The backends that run plain and differential attention natively on this chip."""
    return ["xla", "reference", *FUSED.get(CHIP.platform, [])]


def fwd_bwd(core, inputs):
    """A weighted sum of the output and its gradient w.r.t. every input.

    Returning the value keeps the forward's A·V product alive (``jax.grad`` alone lets
    XLA drop it, which no training step can); random weights stop XLA folding a
    constant cotangent into the backward.
    """
    weights = jax.random.normal(jax.random.key(1), inputs[-1].shape, inputs[-1].dtype)

    def loss(*xs):
        return jnp.sum(core(*xs).astype(jnp.float32) * weights)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(inputs)))))


def measure(batch, length, implementation, dtype, repeats):
    """(seconds, peak bytes) of plain and differential fwd+bwd, timed in alternation."""
    keys = jax.random.split(jax.random.key(0), 5)
    qkv = [jax.random.normal(k, (batch, length, HEADS, HEAD_DIM), dtype) for k in keys]
    plain = functools.partial(
        attn_lib.dot_product_attention, implementation=implementation, chip=CHIP
    )
    diff = functools.partial(
        attn_lib.differential_attention, lam=0.1, implementation=implementation, chip=CHIP
    )
    calls = [(fwd_bwd(plain, qkv[:3]), qkv[:3]), (fwd_bwd(diff, qkv), qkv)]
    seconds = common.interleaved_medians(calls, repeats=repeats)
    peaks = [common.compiled_peak_bytes(step, *inputs) for step, inputs in calls]
    return list(zip(seconds, peaks, strict=True))


def measure_blocks(batch, length, dtype, repeats):
    """(seconds, peak bytes) of a plain and a differential ViT-B block, fwd+bwd."""
    spec = jax.random.normal(jax.random.key(0), (batch, length, 768), dtype)
    calls = []
    for variant in ("plain", "asda"):
        cfg = model_lib.preset("base", attention=variant)
        run = model_lib.Execution(chip=CHIP.name, dtype=jnp.dtype(dtype).name)
        block = model_lib.Block(cfg, layer_index=0, run=run)
        params = block.init(jax.random.key(1), spec, None, False)

        def loss(params, x, block=block):
            out, _ = block.apply(params, x, None, False)
            return jnp.sum(out.astype(jnp.float32))

        calls.append((jax.jit(jax.grad(loss, argnums=(0, 1))), (params, spec)))
    seconds = common.interleaved_medians(calls, repeats=repeats)
    peaks = [common.compiled_peak_bytes(step, *inputs) for step, inputs in calls]
    return list(zip(seconds, peaks, strict=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    print(f"machine: {common.machine()}\nversions: {common.versions()}\ndtype: {args.dtype}")
    header = [
        "shape", "backend", "plain ms", "diff ms", "diff / plain (same backend)",
        "diff / plain xla", "plain MiB", "diff MiB",
    ]  # fmt: skip
    rows = []
    for shape_name, (batch, length) in SHAPES.items():
        results = {
            impl: measure(batch, length, impl, dtype, args.repeats) for impl in backends_here()
        }
        plain_xla = results["xla"][0][0]
        for impl, ((plain_s, plain_b), (diff_s, diff_b)) in results.items():
            rows.append([
                shape_name, impl, f"{plain_s * 1e3:.2f}", f"{diff_s * 1e3:.2f}",
                f"{diff_s / plain_s:.2f}×", f"{diff_s / plain_xla:.2f}×",
                f"{plain_b / 2**20:.1f}", f"{diff_b / 2**20:.1f}",
            ])  # fmt: skip
    common.print_table(
        "Attention core, forward + backward, median of repeats (12 heads × 64)", header, rows
    )
    block_rows = []
    for shape_name, (batch, length) in SHAPES.items():
        (plain_s, plain_b), (diff_s, diff_b) = measure_blocks(batch, length, dtype, args.repeats)
        block_rows.append([
            shape_name, f"{plain_s * 1e3:.1f}", f"{diff_s * 1e3:.1f}", f"{diff_s / plain_s:.2f}×",
            f"{plain_b / 2**20:.0f}", f"{diff_b / 2**20:.0f}",
        ])  # fmt: skip
    common.print_table(
        "Whole ViT-B block (768 wide, MLP 3.5×), forward + backward, default backend",
        ["shape", "plain block ms", "diff block ms", "diff / plain", "plain MiB", "diff MiB"],
        block_rows,
    )


if __name__ == "__main__":
    main()
