"""The decoder's block (grouped k×k conv + bias → LayerNorm → GELU, plus the residual)
as one Pallas TPU kernel per example, forward and backward.

XLA runs the block as a grouped convolution in a batch-minor layout with the
LayerNorm, GELU and residual in fusions around it and layout copies between them.
Here an example's whole (time × freq) grid is one block: HBM sees the block's input
and output going forward, and the input, the output's gradient and the input's
gradient coming back (the convolution and normalisation are recomputed, nothing is
saved).

Layout: channels-major (B, C, S), S = H·W the flattened grid, so each example's
block is (C, S) with the channels on sublanes. A group's channels are then whole
sublane tiles (on lanes they would straddle tiles), and a tap (dy, dx) of the
convolution is a roll of the lanes by dy·W + dx with the out-of-grid positions
masked. Per group the taps are stacked into (k²·Cin/G, S) columns and multiplied by
the group's (Cout/G, k²·Cin/G) weights: one matmul per group. The kernel's gradient
and the bias's are summed over the examples in VMEM-resident accumulators, then over
devices (in the parameters' layout, reduce-scattered where FSDP shards them). Where a
device holds two cores (``hardware.Chip.cores_per_device``) the backward's leading
"parallel" grid axis gives each core half the examples and accumulators of its own,
summed after the call, where the chip's VMEM holds the split (``backward_cores``).

The input and the convolution live in float32 scratch and the normalisation runs a
lane tile at a time, so no (C, S) float32 temporary outlives its chunk. An example's
whole grid is one block, so VMEM bounds the grid: the kernel asks for the chip's
``hardware.Chip.kernel_vmem_bytes``, and ``vmem_bytes`` estimates what a grid needs
(``config_lib`` sends a pretraining grid that does not fit to the XLA form).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from asda_jax import hardware, sharding
from asda_jax.kernels import mlp
from asda_jax.kernels.mlp import gelu_slope, normal_cdf

LN_EPSILON = 1e-5  # the release's LayerNorm over the decoder's channels (no affine)


def conv_block(x, kernel, bias, grid, *, groups, vmem_bytes=None, cores=1, interpret=False):
    """gelu(LN(conv(x) + bias)) [+ x when the widths match] of channels-major ``x``
    (B, Cin, H·W) over a ``grid`` = (H, W) of patches; ``kernel`` (k, k, Cin/G, Cout)
    in ``nn.Conv``'s layout, ``bias`` (Cout,): (B, Cout, H·W) in x's dtype. The kernel
    may use ``vmem_bytes`` of VMEM (the chip's ``kernel_vmem_bytes``; None: Mosaic's
    default); the backward splits a device's examples over its ``cores``
    (``hardware.Chip.cores_per_device``)."""
    k, _, per_in, cout = kernel.shape
    if x.shape[1] != per_in * groups or cout % groups:
        raise ValueError(f"kernel {kernel.shape} does not take {x.shape[1]} channels in {groups}")
    if x.shape[2] != math.prod(grid):
        raise ValueError(f"{x.shape[2]} positions are not a {grid} grid")
    shifts, masks = tap_shifts_and_masks(grid, k)
    options = (shifts, groups, vmem_bytes, cores, interpret)
    return _block(x, kernel.astype(x.dtype), bias.astype(jnp.float32)[:, None], masks, options)


def vmem_bytes(
    channels: int, cout: int, positions: int, groups: int, k: int, itemsize: int, cores: int = 1
) -> int:
    """An estimate of the VMEM one example's backward holds (the larger pass) for a
    block of ``channels`` in, ``cout`` out over ``positions`` in ``itemsize``-byte
    activations: its double-buffered blocks (input, output gradient, input gradient,
    weights, masks, float32 weight-gradient accumulators), the two float32 (C, S)
    scratch planes, one group's columns with their float32 gradient, and where the
    examples are split over ``cores`` the input-sized float32 plane per extra core that
    the compiler adds; a tenth more for the compiler's own temporaries (the estimate
    and the compiler's count are compared in BENCHMARKS.md)."""
    width = k * k * channels // groups  # a group's columns
    blocks = (
        (2 * channels + cout) * positions * itemsize
        + cout * width * (itemsize + 4)
        + k * k * positions * 4
        + cout * hardware.LANES * 4  # the bias gradient, one lane tile wide
    )
    scratch = (channels + cout) * positions * 4
    columns = width * positions * (itemsize + 4 + 4)
    per_core = (cores - 1) * channels * positions * 4
    return int(1.1 * (2 * blocks + scratch + columns + per_core))


def backward_cores(x_shape, cout: int, groups: int, k: int, itemsize: int, cores: int, vmem):
    """Over how many of a device's ``cores`` the backward splits its (B, C, S) examples:
    all of them where the split's blocks fit the kernel's ``vmem`` (None: no bound),
    else one (a device's examples on one core fit where the kernel was chosen)."""
    split = mlp.cores_splitting(x_shape[0], cores)
    _, channels, positions = x_shape
    need = vmem_bytes(channels, cout, positions, groups, k, itemsize, split)
    return split if vmem is None or need <= vmem else 1


def _grouped(kernel, groups: int):  # (k, k, i, G·o) -> (G, o, k²·i)
    """The kernel as each group's matrix: row o of group g, column tap·i + channel."""
    k, _, per_in, cout = kernel.shape
    weights = kernel.reshape(k * k, per_in, groups, cout // groups).transpose(2, 3, 0, 1)
    return weights.reshape(groups, cout // groups, k * k * per_in)


def _ungrouped(weights, k: int):  # (G, o, k²·i) -> (k, k, i, G·o), ``_grouped``'s inverse
    groups, per_out, width = weights.shape
    columns = weights.reshape(groups, per_out, k * k, width // (k * k)).transpose(2, 3, 0, 1)
    return columns.reshape(k, k, width // (k * k), groups * per_out)


def tap_shifts_and_masks(grid: tuple[int, int], k: int) -> tuple[tuple[int, ...], np.ndarray]:
    """For each tap (dy, dx), row-major: the lane offset dy·W + dx of the position it
    reads, and a (k², H·W) float32 mask, 1 where that position is inside the grid
    (SAME zero padding)."""
    height, width = grid
    rows, cols = np.divmod(np.arange(height * width), width)
    shifts, masks = [], []
    for dy in range(-(k // 2), k // 2 + 1):
        for dx in range(-(k // 2), k // 2 + 1):
            shifts.append(dy * width + dx)
            inside = (
                (rows + dy >= 0) & (rows + dy < height) & (cols + dx >= 0) & (cols + dx < width)
            )
            masks.append(inside)
    return tuple(shifts), np.stack(masks).astype(np.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block(x, kernel, bias, masks, options):  # (shifts, groups, VMEM, cores, interpret)
    shifts, groups, vmem, _, interpret = options
    return _forward(x, kernel, bias, masks, (shifts, groups, vmem, interpret))


def _block_fwd(x, kernel, bias, masks, options):
    shifts, groups, vmem, _, interpret = options
    out = _forward(x, kernel, bias, masks, (shifts, groups, vmem, interpret))
    return out, (x, kernel, bias, masks)


def _block_bwd(options, residuals, d_out):
    x, kernel, bias, masks = residuals
    dx, d_kernel, d_bias = _backward(x, kernel, bias, masks, d_out, options)
    return dx, d_kernel.astype(kernel.dtype), d_bias, None


_block.defvjp(_block_fwd, _block_bwd)


# ----------------------------------------------------------------------------- kernels


def _lane_chunks(size: int) -> list[slice]:
    """Slices of one lane tile each when they tile ``size``: the LayerNorm, GELU and
    casts run a chunk at a time, so no (C, S) float32 temporary outlives its chunk."""
    lanes = hardware.LANES
    if size % lanes:
        return [slice(0, size)]
    return [slice(i, i + lanes) for i in range(0, size, lanes)]


def _columns(rows, masks, shifts, dtype):  # (i, S) float32 -> (k²·i, S) in dtype
    """A group's k² shifted, masked copies of its input channels, stacked."""
    size = rows.shape[1]
    taps = [
        rows if s == 0 else pltpu.roll(rows, (-s) % size, 1) * masks[t : t + 1]
        for t, s in enumerate(shifts)
    ]
    return jnp.concatenate(taps, axis=0).astype(dtype)


def _widths(w_ref, shifts):  # (groups, Cout/G, Cin/G)
    groups, per_out, width = w_ref.shape
    return groups, per_out, width // len(shifts)


def _load_float32(x_ref, x32_ref):
    """x into float32 scratch, whose (8, 128) tiles slice at any group width that is
    a multiple of 8 (bfloat16's at multiples of 16)."""
    for c in _lane_chunks(x_ref.shape[1]):
        x32_ref[:, c] = x_ref[:, c].astype(jnp.float32)


def _convolve(x32_ref, w_ref, b_ref, masks, shifts, y_ref):
    """y = conv(x) + b, a group at a time: each group's columns live only for its product."""
    groups, per_out, per_in = _widths(w_ref, shifts)
    for g in range(groups):
        columns = _columns(x32_ref[g * per_in : (g + 1) * per_in, :], masks, shifts, w_ref.dtype)
        outs = slice(g * per_out, (g + 1) * per_out)
        y_ref[outs, :] = (
            jnp.dot(w_ref[g], columns, preferred_element_type=jnp.float32) + b_ref[outs, :]
        )


def _normalised(y):  # (C, L) -> z = LN(y) over the channels, and 1/σ (1, L)
    centred = y - jnp.mean(y, axis=0, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=0, keepdims=True) + LN_EPSILON)
    return centred * inv_std, inv_std


def _forward_kernel(x_ref, w_ref, b_ref, m_ref, out_ref, x32_ref, y_ref, *, shifts):
    _load_float32(x_ref, x32_ref)
    _convolve(x32_ref, w_ref, b_ref, m_ref[...], shifts, y_ref)
    for c in _lane_chunks(y_ref.shape[1]):
        z, _ = _normalised(y_ref[:, c])
        out = z * normal_cdf(z)
        if out_ref.shape == x_ref.shape:  # the residual
            out = out + x32_ref[:, c]
        out_ref[:, c] = out.astype(out_ref.dtype)


def _backward_kernel(
    x_ref, w_ref, b_ref, m_ref, do_ref, dx_ref, dw_ref, db_ref, x32_ref, y_ref, *, shifts
):
    @pl.when(pl.program_id(1) == 0)  # grid (core, example): each core's first example
    def _():
        dw_ref[...] = jnp.zeros_like(dw_ref)
        db_ref[...] = jnp.zeros_like(db_ref)

    masks = m_ref[...]
    _load_float32(x_ref, x32_ref)
    _convolve(x32_ref, w_ref, b_ref, masks, shifts, y_ref)
    for c in _lane_chunks(y_ref.shape[1]):  # y_ref: y, then dL/dy
        z, inv_std = _normalised(y_ref[:, c])
        dz = do_ref[:, c].astype(jnp.float32) * gelu_slope(z, normal_cdf(z))
        # LayerNorm without affine: dy = (dz − mean(dz) − z·mean(dz·z)) / σ
        mean_dz = jnp.mean(dz, axis=0, keepdims=True)
        y_ref[:, c] = inv_std * (dz - mean_dz - z * jnp.mean(dz * z, axis=0, keepdims=True))
        db_ref[...] += jnp.sum(y_ref[:, c], axis=1, keepdims=True)
    groups, per_out, per_in = _widths(w_ref, shifts)
    size = y_ref.shape[1]
    for g in range(groups):
        ins = slice(g * per_in, (g + 1) * per_in)
        dy = y_ref[g * per_out : (g + 1) * per_out, :].astype(w_ref.dtype)  # (o, S)
        columns = _columns(x32_ref[ins, :], masks, shifts, w_ref.dtype)  # recomputed
        dw_ref[g] += jax.lax.dot_general(
            dy, columns, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )  # (o, k²·i)
        d_columns = jax.lax.dot_general(
            w_ref[g], dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # (k²·i, S)
        dx = 0.0
        for t, s in enumerate(shifts):  # each tap's gradient back to the position it read
            d_tap = d_columns[t * per_in : (t + 1) * per_in]
            dx = dx + (d_tap if s == 0 else pltpu.roll(d_tap * masks[t : t + 1], s % size, 1))
        x32_ref[ins, :] = dx  # only this group read these channels: x32_ref becomes dL/dx
    for c in _lane_chunks(size):
        dx = x32_ref[:, c]
        if dx_ref.shape == do_ref.shape:  # the residual
            dx = dx + do_ref[:, c].astype(jnp.float32)
        dx_ref[:, c] = dx.astype(dx_ref.dtype)


def _example(channels, size):  # one example's (C, S) block of a (B, C, S) array
    return pl.BlockSpec((None, channels, size), lambda b: (b, 0, 0))


def _whole(shape):  # the same block at every step: weights, masks
    return pl.BlockSpec(shape, lambda *step: (0,) * len(shape))


def _core_example(channels, size, per_core):  # ``_example`` on the (core, example) grid
    return pl.BlockSpec((None, channels, size), lambda c, b: (c * per_core + b, 0, 0))


def _core_partial(shape):  # each core's own accumulator of a (cores, ...) array
    return pl.BlockSpec((None, *shape[1:]), lambda c, b: (c,) + (0,) * (len(shape) - 1))


def _pallas(kernel, x, weights, out_shape, in_specs, out_specs, cost, grid, semantics, options):
    """One pass of ``kernel`` over ``grid`` (``semantics`` per axis) of this device's
    (B, C, S) examples, with float32 scratch for an example's input and its convolution
    (C, S) each; ``options`` = (VMEM limit, interpret)."""
    vmem, interpret = options
    _, channels, size = x.shape
    cout = weights.shape[0] * weights.shape[1]
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[
            pltpu.VMEM((channels, size), jnp.float32),
            pltpu.VMEM((cout, size), jnp.float32),
        ],
        cost_estimate=cost,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=vmem),
        interpret=pltpu.InterpretParams() if interpret else False,
    )


def _conv_flops(x, weights) -> int:  # one pass of the grouped convolution over x's examples
    groups, per_out, width = weights.shape
    return 2 * x.shape[0] * x.shape[2] * groups * per_out * width


def _forward(x, kernel, bias, masks, options):  # -> (B, Cout, S)
    shifts, groups, vmem, interpret = options
    cout = kernel.shape[3]

    def run(x, kernel, bias, masks):
        batch, channels, size = x.shape
        weights = _grouped(kernel, groups)
        out = jax.ShapeDtypeStruct((batch, cout, size), x.dtype)
        cost = pl.CostEstimate(
            flops=_conv_flops(x, weights),
            transcendentals=out.size,
            bytes_accessed=x.nbytes + out.size * out.dtype.itemsize + weights.nbytes,
        )
        call = _pallas(
            functools.partial(_forward_kernel, shifts=shifts),
            x,
            weights,
            [out],
            [_example(channels, size), *(_whole(a.shape) for a in (weights, bias, masks))],
            [_example(cout, size)],
            cost,
            (batch,),
            ("parallel",),
            (vmem, interpret),
        )
        return call(x, weights, bias, masks)[0]

    by_example, whole = sharding.split("batch"), sharding.WHOLE
    splits = (by_example, whole, whole, whole)
    return sharding.per_device(run, splits, by_example, check_vma=False)(x, kernel, bias, masks)


def _backward(x, kernel, bias, masks, d_out, options):  # -> dx, d_kernel, d_bias (float32)
    shifts, groups, vmem, cores, interpret = options

    def run(x, d_out, kernel, bias, masks):
        batch, channels, size = x.shape
        weights = _grouped(kernel, groups)
        split = backward_cores(
            x.shape, kernel.shape[3], groups, kernel.shape[0], x.dtype.itemsize, cores, vmem
        )
        per_core = batch // split
        example = functools.partial(_core_example, size=size, per_core=per_core)
        partials = [(split, *weights.shape), (split, *bias.shape)]
        out_shape = [
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            *(jax.ShapeDtypeStruct(p, jnp.float32) for p in partials),
        ]
        cost = pl.CostEstimate(
            flops=3 * _conv_flops(x, weights),  # the recomputed forward, dW and dx
            transcendentals=2 * d_out.size,
            bytes_accessed=2 * x.nbytes + d_out.nbytes + weights.nbytes,
        )
        call = _pallas(
            functools.partial(_backward_kernel, shifts=shifts),
            x,
            weights,
            out_shape,
            [
                example(channels),
                *(_whole(a.shape) for a in (weights, bias, masks)),
                example(d_out.shape[1]),
            ],
            [example(channels), *map(_core_partial, partials)],
            cost,
            (split, per_core),
            # the dW and db accumulators are carried from example to example within a core
            ("parallel", "arbitrary"),
            (vmem, interpret),
        )
        dx, d_weights, d_bias = call(x, weights, bias, masks, d_out)
        return dx, _ungrouped(d_weights.sum(axis=0), kernel.shape[0]), d_bias.sum(axis=0)

    by_example, whole = sharding.split("batch"), sharding.WHOLE
    in_splits = (by_example, by_example, whole, whole, whole)
    # the gradients leave laid out as the parameters are (``model.decoder.DecoderBlock``)
    out_splits = (
        by_example,
        sharding.summed("conv_time", "conv_freq", "conv_in", "embed"),
        sharding.summed("embed", None),
    )
    return sharding.per_device(run, in_splits, out_splits, check_vma=False)(
        x, d_out, kernel, bias, masks
    )
