"""Parts of the pretraining step compiled alone for a preset's chips: one student
encoder block and the CNN decoder, forward and backward, at the step's shapes. A part
compiles in 2–4 min here where the whole step takes 35, so each change to a part is
measured against its previous form in one run.

    python -m benchmarks.aot_parts [--config=configs/pretrain_as2m.py:mesh=v5e-8]
        [--parts=block,decoder] [--variants="decoder_conv_impl=taps;attention_impl=xla"]

Each row: the compiler's bytes accessed per chip, the HLO's op traffic split into HBM
and on-chip memory spaces (``hlo.traffic``), the compiler's FLOPs and the compile time;
the first row of each part is the config's own execution, each variant (``;``-separated
``model.Execution`` overrides, ``,`` within one) a row with its ratio of bytes to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from asda_jax import aot, config_lib, hardware, hlo, sharding
from asda_jax import model as model_lib
from benchmarks import common


def step_shapes(run: config_lib.RunConfig) -> dict[str, tuple[int, ...]]:
    """Global shapes of a student block's and the decoder's inputs in the step."""
    model, mask = run.model, run.mask
    frames = run.data.target_frames
    grid = (frames // model.patch_size, model.freq_patches)
    rows = run.data.batch_size * mask.clone_batch
    kept = mask.num_kept(grid[0] * grid[1])
    return {
        "block": (rows, kept + 1, model.embed_dim),  # kept patches and CLS
        "decoder": (rows, *grid, model.decoder_dim),
    }


def part_loss(part: str, model: model_lib.ModelConfig, run: model_lib.Execution):
    """(module, loss of (params, input)): the squared output, so the backward runs."""
    if part == "block":
        module = model_lib.block_class(run)(model, 0, 0.0, run)
        apply = lambda p, x: module.apply({"params": p}, x, None, False)[0]
        init_args = (None, False)
    else:
        module = model_lib.Decoder(model, run)
        apply = lambda p, x: module.apply({"params": p}, x)
        init_args = ()

    def loss(params, x):
        return jnp.sum(jnp.square(apply(params, x).astype(jnp.float32)))

    return module, init_args, loss


def compile_part(part: str, shape, model, run, mesh) -> dict:
    module, init_args, loss = part_loss(part, model, run)
    one = jnp.zeros((1, *shape[1:]))
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), one, *init_args))["params"]
    params = nn.meta.unbox(boxed)
    param_shardings = sharding.logical_shardings(boxed, mesh)
    batch = sharding.batch_sharding(mesh)
    x = jax.ShapeDtypeStruct(shape, run.compute_dtype, sharding=batch)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(param_shardings, batch))
    start = time.perf_counter()
    with sharding.activate(mesh):
        compiled = grad.lower(params, x).compile()
    seconds = time.perf_counter() - start
    cost = aot.cost_of(compiled) or {}
    traffic = hlo.traffic(compiled.as_text())
    return {
        "bytes": cost.get("bytes accessed"),
        "hbm": sum(traffic["by_scope"].values()),
        "on_chip": traffic["other_memory"],
        "flops": cost.get("flops"),
        "seconds": seconds,
    }


def parse_variants(text: str) -> list[dict[str, str]]:
    variants = []
    for item in filter(None, (v.strip() for v in text.split(";"))):
        pairs = [p.split("=", 1) for p in item.split(",")]
        variants.append({k.strip(): v.strip() for k, v in pairs})
    return variants


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/pretrain_as2m.py:mesh=v5e-8")
    parser.add_argument("--parts", default="block,decoder")
    parser.add_argument("--variants", default="", help="Execution overrides, ';' between rows")
    args = parser.parse_args()
    path, _, arg = args.config.partition(":")
    config = config_lib.load_file(path, arg or None)
    topology = config.get("topology")
    if not topology:
        raise SystemExit(f"{args.config} names no topology: pick a TPU or GPU mesh preset")
    devices = aot.abstract_devices(topology)
    run_config = config_lib.read(config, hardware.of_devices(devices))
    mesh = sharding.make_mesh(run_config.mesh, devices)
    model, base = run_config.model, run_config.execution
    shapes = step_shapes(run_config)
    print(common.machine())
    print(common.versions(("jax", "jaxlib", "libtpu")))
    rows = []
    for part in args.parts.split(","):
        baseline = None
        for overrides in [{}, *parse_variants(args.variants)]:
            run = dataclasses.replace(base, **overrides).validate()
            got = compile_part(part, shapes[part], model, run, mesh)
            baseline = baseline or got
            label = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "config's own"
            ratio = got["bytes"] / baseline["bytes"] if got["bytes"] else float("nan")
            rows.append([
                part, label, f"{shapes[part]}",
                f"{got['bytes'] / 1e9:.3f}" if got["bytes"] else "n/a", f"{ratio:.2f}",
                f"{got['hbm'] / 1e9:.3f}", f"{got['on_chip'] / 1e9:.3f}",
                f"{got['flops'] / 1e12:.3f}" if got["flops"] else "n/a", f"{got['seconds']:.0f}",
            ])  # fmt: skip
    common.print_table(
        f"Parts of the pretraining step, forward + backward, per chip of {topology}",
        ["part", "execution", "global input", "GB accessed", "× first row", "HLO HBM GB",
         "HLO on-chip GB", "TFLOP", "compile s"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
