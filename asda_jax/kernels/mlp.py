"""The encoder blocks' MLP (fc1 → exact GELU → fc2) as one Pallas TPU kernel per block
of an example's rows, forward and backward.

XLA writes the hidden layer (rows × mlp width) to HBM going forward and reads it back,
and stages it through on-chip memory, in the backward, where the MLP's input and output
are a fraction of that. Here a block of one example's rows and both weight matrices are
in VMEM at once, so the hidden layer never leaves it: the backward recomputes it from x
instead of saving anything, and the weight and bias gradients are summed in
VMEM-resident float32 accumulators over a device's examples, then over devices
(reduce-scattered where FSDP shards the weights: ``sharding.summed``). Where
a device holds two cores (``hardware.Chip.cores_per_device``) both passes' leading
grid axis is "parallel" and gives each core half the examples, or with one example
per device half of its row blocks (``core_split``), and in the backward its own
accumulators, summed after the call: Mosaic splits only parallel axes over the cores,
and the accumulating axes must stay sequential.

The weights stay whole in VMEM, with their float32 gradients and the pipeline's
buffers: the kernel asks for the chip's ``hardware.Chip.kernel_vmem_bytes``, a chip
whose VMEM cannot hold them runs XLA's MLP (its row's ``forms.mlp``), and ``vmem_bytes``
estimates what a model's blocks need (``config_lib`` sends a model that does not fit
to the XLA form).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from asda_jax import sharding


def mlp(x, w1, b1, w2, b2, *, vmem_bytes: int, cores: int = 1, interpret=False):
    """fc2(gelu(fc1(x))) of ``x`` (B, T, D), ``w1`` (D, F), ``w2`` (F, D), biases (F,),
    (D,): (B, T, D) in x's dtype; products in the weights' dtype, sums in float32. The
    kernel may use ``vmem_bytes`` of VMEM (the chip's ``kernel_vmem_bytes``); both
    passes split a device's rows over its ``cores`` (``cores_per_device``, ``core_split``)."""
    bias1, bias2 = (b.astype(jnp.float32)[None] for b in (b1, b2))
    options = (vmem_bytes, cores, interpret)
    return _mlp(x, w1.astype(x.dtype), bias1, w2.astype(x.dtype), bias2, options)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _mlp(x, w1, b1, w2, b2, options):  # options: (VMEM bytes, cores, interpret)
    return _forward(x, w1, b1, w2, b2, options)


def _mlp_fwd(x, w1, b1, w2, b2, options):
    return _forward(x, w1, b1, w2, b2, options), (x, w1, b1, w2, b2)  # hidden recomputed


def _mlp_bwd(options, residuals, d_out):
    dx, dw1, db1, dw2, db2 = _backward(*residuals, d_out, options)
    dtype = residuals[1].dtype  # the weights'
    return dx, dw1.astype(dtype), db1, dw2.astype(dtype), db2


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


# ----------------------------------------------------------------------------- kernels


def normal_cdf(z):  # Φ(z): the exact GELU is z·Φ(z) (Mosaic lowers erf, not erfc)
    return 0.5 * (1.0 + jax.lax.erf(z * (1.0 / math.sqrt(2.0))))


def gelu_slope(z, cdf):  # d gelu(z)/dz = Φ(z) + z·φ(z), given Φ(z)
    return cdf + z * jnp.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))


def _product(a, b, contract):  # a·b over dims ``contract`` = (of a, of b), float32
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _forward_kernel(x_ref, w1_ref, b1_ref, w2_ref, b2_ref, out_ref):
    a = jnp.dot(x_ref[...], w1_ref[...], preferred_element_type=jnp.float32) + b1_ref[...]
    h = (a * normal_cdf(a)).astype(w2_ref.dtype)  # (T, F)
    out = jnp.dot(h, w2_ref[...], preferred_element_type=jnp.float32) + b2_ref[...]
    out_ref[...] = out.astype(out_ref.dtype)


def _backward_kernel(
    x_ref, w1_ref, b1_ref, w2_ref, b2_ref, do_ref, dx_ref, dw1_ref, db1_ref, dw2_ref, db2_ref,
    *, length, core_blocks,
):  # fmt: skip
    # grid (core, example, block of rows): each core's accumulators start at its first step
    @pl.when((pl.program_id(1) == 0) & (pl.program_id(2) == 0))
    def _():
        for ref in (dw1_ref, db1_ref, dw2_ref, db2_ref):
            ref[...] = jnp.zeros_like(ref)

    # rows past the sequence in its last block hold whatever was there: zeroed, they add
    # nothing to the weights' gradients. ``core_blocks``: the row blocks each core takes
    # of an example (0 where the cores share the examples instead)
    rows = x_ref.shape[0]
    block = pl.program_id(0) * core_blocks + pl.program_id(2)
    position = block * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    inside = position < length
    x = jnp.where(inside, x_ref[...], jnp.zeros_like(x_ref[...]))
    d_out = jnp.where(inside, do_ref[...], jnp.zeros_like(do_ref[...]))
    a = jnp.dot(x, w1_ref[...], preferred_element_type=jnp.float32) + b1_ref[...]
    cdf = normal_cdf(a)
    h = (a * cdf).astype(w2_ref.dtype)
    dw2_ref[...] += _product(h, d_out, ((0,), (0,)))  # (F, D)
    db2_ref[...] += jnp.sum(d_out.astype(jnp.float32), axis=0, keepdims=True)
    dh = _product(d_out, w2_ref[...], ((1,), (1,)))  # (T, F)
    da = dh * gelu_slope(a, cdf)
    db1_ref[...] += jnp.sum(da, axis=0, keepdims=True)
    da = da.astype(w1_ref.dtype)
    dw1_ref[...] += _product(x, da, ((0,), (0,)))  # (D, F)
    dx_ref[...] = _product(da, w1_ref[...], ((1,), (1,))).astype(dx_ref.dtype)


MAX_ROWS = 512  # rows of one block: each row's hidden layer has float32 temporaries


def rows_per_block(length: int) -> int:
    """A sequence's rows in blocks of at most MAX_ROWS, as even as whole sublane tiles
    of 8 allow (513 tokens: 264 + 249, not 512 + 1)."""
    if length <= MAX_ROWS:
        return length  # one block, the whole sequence
    per_block = math.ceil(length / math.ceil(length / MAX_ROWS))
    return math.ceil(per_block / 8) * 8


def vmem_bytes(embed: int, hidden: int, length: int, itemsize: int) -> int:
    """An estimate of the VMEM the backward (the larger pass) holds for an MLP of
    ``embed`` → ``hidden`` → ``embed`` over sequences of ``length`` rows in
    ``itemsize``-byte activations: its blocks as the block specs lay them out, each
    double-buffered by the pipeline: both weight matrices, their float32 gradient
    accumulators, the biases' and a block of rows of the input, the output gradient
    and the input gradient. libtpu's own count is within a few MiB of it at the
    release's and EAT's widths (BENCHMARKS.md); on a chip with room to spare it may
    hold whole operands in VMEM outside the kernel's share and need less."""
    weights = 2 * embed * hidden * itemsize
    accumulators = 2 * embed * hidden * 4 + (embed + hidden) * 4
    blocks = 3 * rows_per_block(length) * embed * itemsize + (embed + hidden) * 4
    return 2 * (weights + accumulators + blocks)


@dataclasses.dataclass(frozen=True)
class CoreSplit:
    """How a device's (B, T, D) rows are laid over the grid (core, example, row block)
    of both passes: each core takes its share of the examples where they divide
    evenly over the cores, else its share of every example's row blocks (one example
    per device, as in fine-tuning on a large slice), else everything runs on one."""

    cores: int  # the grid's leading, "parallel" axis
    examples: int  # examples per core
    blocks: int  # row blocks per core and example
    rows: int  # rows per block
    by_rows: bool  # the cores share each example's row blocks (else the examples)

    def block_spec(self, x) -> pl.BlockSpec:  # one block of rows of a (B, T, D) array
        example_stride, block_stride = (0, self.blocks) if self.by_rows else (self.examples, 0)
        return pl.BlockSpec(
            (None, self.rows, x.shape[2]),
            lambda c, b, r: (c * example_stride + b, c * block_stride + r, 0),
        )

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.cores, self.examples, self.blocks


def core_split(examples: int, length: int, cores: int) -> CoreSplit:
    """The ``CoreSplit`` of ``examples`` sequences of ``length`` rows over ``cores``
    (``hardware.Chip.cores_per_device``): by examples where they divide evenly; else by
    row blocks, as many per core, where the sequence fills them (one block of whole
    sublane tiles each); else one core."""
    rows = rows_per_block(length)
    blocks = pl.cdiv(length, rows)
    if (by_examples := cores_splitting(examples, cores)) > 1:
        return CoreSplit(by_examples, examples // by_examples, blocks, rows, by_rows=False)
    if cores > 1:
        split_blocks = cores * math.ceil(blocks / cores)
        split_rows = math.ceil(length / split_blocks / 8) * 8
        if pl.cdiv(length, split_rows) == split_blocks:
            return CoreSplit(cores, examples, split_blocks // cores, split_rows, by_rows=True)
    return CoreSplit(1, examples, blocks, rows, by_rows=False)


def _whole(a):  # the same block at every step: weights, biases
    return pl.BlockSpec(a.shape, lambda *step: (0,) * len(a.shape))


def _core_partial(a):  # each core's own accumulator of a (cores, ...) array
    return pl.BlockSpec((None, *a.shape[1:]), lambda c, b, r: (c,) + (0,) * (len(a.shape) - 1))


def _pallas(kernel, inputs, out_shape, in_specs, out_specs, grid, flops, semantics, vmem,
            interpret):  # fmt: skip
    """``kernel`` over ``grid`` (``semantics`` per axis), ``inputs[0]`` this device's
    (B, T, D) rows."""
    moved = sum(a.size * a.dtype.itemsize for a in [*inputs, *out_shape])
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=moved),
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(*inputs)


def cores_splitting(examples: int, cores: int) -> int:
    """The cores a device's ``examples`` are split over: all where they divide evenly,
    else one (an uneven split would leave a core idle for a step anyway)."""
    return cores if examples % cores == 0 else 1


def _matmul_flops(x, w1) -> int:  # one of the MLP's products over x's rows
    return 2 * x.shape[0] * x.shape[1] * w1.shape[0] * w1.shape[1]


def _forward(x, w1, b1, w2, b2, options):  # -> (B, T, D)
    vmem, cores, interpret = options

    def run(x, w1, b1, w2, b2):
        split = core_split(x.shape[0], x.shape[1], cores)
        return _pallas(
            _forward_kernel,
            [x, w1, b1, w2, b2],
            [jax.ShapeDtypeStruct(x.shape, x.dtype)],
            [split.block_spec(x), *map(_whole, (w1, b1, w2, b2))],
            [split.block_spec(x)],
            split.grid,
            2 * _matmul_flops(x, w1),
            ("parallel", "parallel", "parallel"),
            vmem,
            interpret,
        )[0]

    by_example, whole = sharding.split("batch"), sharding.WHOLE
    splits = (by_example, whole, whole, whole, whole)
    return sharding.per_device(run, splits, by_example, check_vma=False)(x, w1, b1, w2, b2)


def _backward(x, w1, b1, w2, b2, d_out, options):  # -> dx, dW1, db1, dW2, db2 (float32)
    vmem, cores, interpret = options

    def run(x, d_out, w1, b1, w2, b2):
        split = core_split(x.shape[0], x.shape[1], cores)
        weights = [w1, b1, w2, b2]
        partials = [jax.ShapeDtypeStruct((split.cores, *w.shape), jnp.float32) for w in weights]
        kernel = functools.partial(
            _backward_kernel, length=x.shape[1], core_blocks=split.blocks * split.by_rows
        )
        dx, *summed = _pallas(
            kernel,
            [x, w1, b1, w2, b2, d_out],
            [jax.ShapeDtypeStruct(x.shape, x.dtype), *partials],
            [split.block_spec(x), *map(_whole, weights), split.block_spec(d_out)],
            [split.block_spec(x), *map(_core_partial, partials)],
            split.grid,
            5 * _matmul_flops(x, w1),  # the recomputed fc1, dW2, dh, dW1, dx
            # the accumulators are carried from step to step within a core
            ("parallel", "arbitrary", "arbitrary"),
            vmem,
            interpret,
        )
        return dx, *(p.sum(axis=0) for p in summed)

    by_example, whole, summed = sharding.split("batch"), sharding.WHOLE, sharding.summed
    in_splits = (by_example, by_example, whole, whole, whole, whole)
    # each weight's gradient leaves laid out as the weight is (``model.encoder.Mlp``)
    out_splits = (
        by_example,
        summed("embed", "mlp"),
        summed(None, "mlp"),
        summed("mlp", "embed"),
        summed(None, "embed"),
    )
    return sharding.per_device(run, in_splits, out_splits, check_vma=False)(
        x, d_out, w1, b1, w2, b2
    )
