"""The MLP kernel's VMEM: ``kernels.mlp.vmem_bytes``'s estimate against libtpu's own
count. One MLP (bfloat16 rows, float32 weights as the model holds them), forward and
backward, compiled alone for a TPU topology's abstract devices with the kernel's VMEM
limit set; where libtpu refuses, its message says how much the kernel needed.

    python -m benchmarks.mlp_vmem [--cases "v6e:2x2 1024 4096 513 2 100"]

A case is ``topology embed hidden tokens examples_per_device limit_MiB``; the backward
splits over the chip's cores as ``kernels.mlp.core_split`` decides. The default cases
set each limit just under libtpu's count (so that its refusal states the count) and,
for the widest MLP, at the v5p and v6e kernels' own limits: the rows in BENCHMARKS.md.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from asda_jax import aot, hardware, sharding
from asda_jax.kernels import mlp
from benchmarks import common
from benchmarks.decoder_vmem import libtpu_need

ITEMSIZE = 2  # bfloat16 rows
DEFAULT_CASES = (
    "v5p:2x2x1 768 2688 513 2 47;v5p:2x2x1 768 3072 513 2 52;v5p:2x2x1 768 3072 513 1 34;"
    "v5p:2x2x1 1024 4096 513 2 64;v6e:2x2 1024 4096 513 2 100;v5p:2x2x1 384 1344 1213 4 15"
)
MiB = 2**20


def compile_mlp(topology: str, embed: int, hidden: int, tokens: int, per_device: int,
                limit: int) -> str | None:  # fmt: skip
    """None where the MLP's forward and backward compile within ``limit`` bytes of VMEM,
    else libtpu's message."""
    devices = aot.abstract_devices(topology)
    cores = hardware.of_topology(topology).cores_per_device
    mesh = sharding.make_mesh(sharding.DATA_PARALLEL, devices)
    batch, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    x = jax.ShapeDtypeStruct((per_device * len(devices), tokens, embed), jnp.bfloat16,
                             sharding=batch)  # fmt: skip
    weights = [
        jax.ShapeDtypeStruct(shape, jnp.float32, sharding=whole)
        for shape in ((embed, hidden), (hidden,), (hidden, embed), (embed,))
    ]

    def loss(*arrays):
        out = mlp.mlp(*arrays, vmem_bytes=limit, cores=cores)
        return out.astype(jnp.float32).sum()

    with sharding.activate(mesh):
        try:
            jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(x, *weights).compile()
        except Exception as error:  # libtpu's refusal is the measurement
            return str(error)
    return None


def main() -> None:
    rows = []
    for topology, embed, hidden, tokens, per_device, limit_mib in common.cases_from_flag(
        DEFAULT_CASES
    ):
        embed, hidden, tokens, per_device = map(int, (embed, hidden, tokens, per_device))
        start = time.perf_counter()
        refusal = compile_mlp(topology, embed, hidden, tokens, per_device, int(limit_mib) * MiB)
        seconds = time.perf_counter() - start
        need = mlp.vmem_bytes(embed, hidden, tokens, ITEMSIZE)
        cores = hardware.of_topology(topology).cores_per_device
        split = mlp.core_split(per_device, tokens, cores)
        rows.append(
            [
                topology, f"{embed} → {hidden}", tokens, per_device,
                f"{split.cores} by {'rows' if split.by_rows else 'examples'}", limit_mib,
                "compiles" if refusal is None else libtpu_need(refusal),
                f"{need / MiB:.1f}", f"{seconds:.0f}",
            ]
        )  # fmt: skip
    common.print_table(
        f"MLP kernel VMEM, libtpu vs the estimate ({common.machine()})",
        ["topology", "MLP", "tokens", "examples/device", "cores", "limit MiB", "libtpu",
         "estimate MiB", "compile s"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
