"""The encoder blocks' MLP (fc1 → exact GELU → fc2) as one Pallas TPU kernel per block
of an example's rows, forward and backward.

XLA writes the hidden layer (rows × mlp width) to HBM going forward and reads it back,
and stages it through on-chip memory, in the backward, where the MLP's input and output
are a fraction of that. Here a block of one example's rows and both weight matrices are
in VMEM at once, so the hidden layer never leaves it: the backward recomputes it from x
instead of saving anything, and the weight and bias gradients are summed in
VMEM-resident float32 accumulators over a device's examples (the grid is sequential),
then over devices.

The weights stay whole in VMEM, with their float32 gradients and the pipeline's
buffers: the kernel asks for the chip's ``hardware.Chip.kernel_vmem_bytes``, and a
chip whose VMEM cannot hold them runs XLA's MLP (its row's ``forms.mlp``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from asda_jax import sharding


def mlp(x, w1, b1, w2, b2, *, vmem_bytes: int, interpret=False):
    """fc2(gelu(fc1(x))) of ``x`` (B, T, D), ``w1`` (D, F), ``w2`` (F, D), biases (F,),
    (D,): (B, T, D) in x's dtype; products in the weights' dtype, sums in float32. The
    kernel may use ``vmem_bytes`` of VMEM (the chip's ``kernel_vmem_bytes``)."""
    bias1, bias2 = (b.astype(jnp.float32)[None] for b in (b1, b2))
    return _mlp(x, w1.astype(x.dtype), bias1, w2.astype(x.dtype), bias2, (vmem_bytes, interpret))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _mlp(x, w1, b1, w2, b2, options):  # options: (VMEM bytes, interpret)
    return _forward(x, w1, b1, w2, b2, *options)


def _mlp_fwd(x, w1, b1, w2, b2, options):
    return _forward(x, w1, b1, w2, b2, *options), (x, w1, b1, w2, b2)  # hidden recomputed


def _mlp_bwd(options, residuals, d_out):
    dx, dw1, db1, dw2, db2 = _backward(*residuals, d_out, *options)
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
    *, length,
):  # fmt: skip
    @pl.when((pl.program_id(0) == 0) & (pl.program_id(1) == 0))
    def _():
        for ref in (dw1_ref, db1_ref, dw2_ref, db2_ref):
            ref[...] = jnp.zeros_like(ref)

    # rows past the sequence in its last block hold whatever was there: zeroed, they add
    # nothing to the weights' gradients
    rows = x_ref.shape[0]
    position = pl.program_id(1) * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
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


def _rows(x, rows):  # a block of ``rows`` of one example of a (B, T, D) array
    return pl.BlockSpec((None, rows, x.shape[2]), lambda b, r: (b, r, 0))


def _whole(a):  # the same block at every step: weights, biases, accumulators
    return pl.BlockSpec(a.shape, lambda b, r: (0,) * len(a.shape))


def _pallas(kernel, inputs, out_shape, in_specs, out_specs, flops, semantics, vmem, interpret):
    """``kernel`` over the examples of this device's (B, T, D) rows (``inputs[0]``) and
    their blocks of rows."""
    x = inputs[0]
    moved = sum(a.size * a.dtype.itemsize for a in [*inputs, *out_shape])
    return pl.pallas_call(
        kernel,
        grid=(x.shape[0], pl.cdiv(x.shape[1], rows_per_block(x.shape[1]))),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=moved),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(semantics, semantics), vmem_limit_bytes=vmem
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(*inputs)


def _matmul_flops(x, w1) -> int:  # one of the MLP's products over x's rows
    return 2 * x.shape[0] * x.shape[1] * w1.shape[0] * w1.shape[1]


def _forward(x, w1, b1, w2, b2, vmem, interpret):  # -> (B, T, D)
    def run(x, w1, b1, w2, b2):
        rows = rows_per_block(x.shape[1])
        return _pallas(
            _forward_kernel,
            [x, w1, b1, w2, b2],
            [jax.ShapeDtypeStruct(x.shape, x.dtype)],
            [_rows(x, rows), *map(_whole, (w1, b1, w2, b2))],
            [_rows(x, rows)],
            2 * _matmul_flops(x, w1),
            "parallel",
            vmem,
            interpret,
        )[0]

    by_example, whole = sharding.split("batch"), sharding.WHOLE
    splits = (by_example, whole, whole, whole, whole)
    return sharding.per_device(run, splits, by_example, check_vma=False)(x, w1, b1, w2, b2)


def _backward(x, w1, b1, w2, b2, d_out, vmem, interpret):  # -> dx, dW1, db1, dW2, db2 (float32)
    def run(x, d_out, w1, b1, w2, b2):
        rows = rows_per_block(x.shape[1])
        grads = [x, w1, b1, w2, b2]
        out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)] + [
            jax.ShapeDtypeStruct(g.shape, jnp.float32) for g in grads[1:]
        ]
        return tuple(
            _pallas(
                functools.partial(_backward_kernel, length=x.shape[1]),
                [x, w1, b1, w2, b2, d_out],
                out_shape,
                [_rows(x, rows), *map(_whole, (w1, b1, w2, b2)), _rows(d_out, rows)],
                [_rows(x, rows), *map(_whole, grads[1:])],
                5 * _matmul_flops(x, w1),  # the recomputed fc1, dW2, dh, dW1, dx
                "arbitrary",  # the gradients' accumulators are carried from example to example
                vmem,
                interpret,
            )
        )

    by_example, whole, summed = sharding.split("batch"), sharding.WHOLE, sharding.SUMMED
    in_splits = (by_example, by_example, whole, whole, whole, whole)
    out_splits = (by_example, summed, summed, summed, summed)
    return sharding.per_device(run, in_splits, out_splits, check_vma=False)(
        x, d_out, w1, b1, w2, b2
    )
