"""The decoder kernel's VMEM: ``kernels.decoder.vmem_bytes``'s estimate against libtpu's
own count. One decoder block (768 → 768 channels, 16 groups, 3 × 3, bfloat16), forward
and backward, compiled alone for a TPU topology's abstract devices with the kernel's
VMEM limit set; where libtpu refuses, its message says how much the kernel needed.

    python -m benchmarks.decoder_vmem [--cases "v4:2x2x1 512 192 1 16;v5p:2x2x1 1024 2 2 64"]

A case is ``topology positions examples_per_device backward_cores limit_MiB``; the
positions form a (positions / 8, 8) grid of patches (512: a 10 s clip). The backward
splits over the cores the case asks for, past ``decoder.backward_cores`` (the rule that
keeps a split within VMEM; its own choice is a column), so that libtpu counts what the
rule guards against. The rows in BENCHMARKS.md came from the default cases, which
bracket that rule and the one ``config_lib`` uses to send a grid to XLA's form.
"""

from __future__ import annotations

import re
import time
from unittest import mock

import jax
import jax.numpy as jnp

from asda_jax import aot, sharding
from asda_jax.kernels import decoder
from benchmarks import common

CHANNELS, GROUPS, K = 768, 16, 3
FREQ_PATCHES = 8
ITEMSIZE = 2  # bfloat16 activations
DEFAULT_CASES = (
    "v4:2x2x1 512 192 1 16;v4:2x2x1 512 192 1 15;v4:2x2x1 512 192 2 16;"
    "v4:2x2x1 512 2 2 16;v4:2x2x1 1024 2 2 16;v5p:2x2x1 1024 2 2 64"
)
MiB = 2**20


def compile_block(topology: str, positions: int, per_device: int, cores: int, limit: int):
    """None where one block's forward and backward compile within ``limit`` bytes of VMEM,
    else libtpu's message."""
    devices = aot.abstract_devices(topology)
    mesh = sharding.make_mesh(sharding.DATA_PARALLEL, devices)
    batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    x = jax.ShapeDtypeStruct(
        (per_device * len(devices), CHANNELS, positions), jnp.bfloat16, sharding=batch
    )  # (B, C, S)
    kernel = jax.ShapeDtypeStruct(
        (K, K, CHANNELS // GROUPS, CHANNELS), jnp.float32, sharding=replicated
    )
    bias = jax.ShapeDtypeStruct((CHANNELS,), jnp.float32, sharding=replicated)
    grid = (positions // FREQ_PATCHES, FREQ_PATCHES)

    def loss(x, kernel, bias):
        y = decoder.conv_block(x, kernel, bias, grid, groups=GROUPS, vmem_bytes=limit, cores=cores)
        return y.astype(jnp.float32).sum()

    as_asked = mock.patch.object(decoder, "backward_cores", lambda *_: cores)
    with sharding.activate(mesh), as_asked:
        try:
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, kernel, bias).compile()
        except Exception as error:  # libtpu's refusal is the measurement
            return str(error)
    return None


def libtpu_need(message: str) -> str:
    """'needs 17.23 MiB' from libtpu's refusal ("Used 17.23M of 16.00M vmem", or "Scoped
    allocation with size 15.35M and limit 15.00M"), else the message's first line."""
    used = re.search(r"Used ([\d.]+)M of [\d.]+M vmem|allocation with size ([\d.]+)M", message)
    if used:
        return f"needs {used.group(1) or used.group(2)} MiB"
    return f"failed: {message.splitlines()[0][:120]}"


def main() -> None:
    rows = []
    for topology, positions, per_device, cores, limit_mib in common.cases_from_flag(DEFAULT_CASES):
        positions, per_device, cores = int(positions), int(per_device), int(cores)
        limit = int(limit_mib) * MiB
        start = time.perf_counter()
        refusal = compile_block(topology, positions, per_device, cores, limit)
        seconds = time.perf_counter() - start
        need = decoder.vmem_bytes(CHANNELS, CHANNELS, positions, GROUPS, K, ITEMSIZE, cores)
        shape = (per_device, CHANNELS, positions)
        rule = decoder.backward_cores(shape, CHANNELS, GROUPS, K, ITEMSIZE, cores, limit)
        rows.append(
            [
                topology, positions, per_device, cores, rule, limit_mib,
                "compiles" if refusal is None else libtpu_need(refusal),
                f"{need / MiB:.1f}", f"{seconds:.0f}",
            ]
        )  # fmt: skip
    common.print_table(
        f"Decoder kernel VMEM, libtpu vs the estimate ({common.machine()})",
        ["topology", "positions", "examples/device", "backward cores", "the rule's cores",
         "limit MiB", "libtpu", "estimate MiB", "compile s"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
