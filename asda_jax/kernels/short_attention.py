"""Differential attention over at most one lane-width of tokens as one Pallas TPU kernel
per (example, head), both branches together, forward and backward.

The student sees 103 tokens. There XLA writes every T×T map to HBM and reads it back
(float32 logits, exponentials and the mixed map going forward; the mixed map's
gradient and each branch's softmax gradient coming back), and splash attention keeps
per-row statistics broadcast over the lanes in float32, four times the queries. Here a
whole sequence fits one block, so the kernel holds both maps in VMEM only and the
backward recomputes them from q and k instead of saving anything: HBM sees q1, k1, q2,
k2, v and the output going forward, and those, the output's gradient and the five input
gradients coming back.

Layout inside: the four parts of q and k as one (4, B, H, T, Dk) array (the TPU
compiler's layout of the release's fused projection, so handing it over whole moves no
bytes) and v as (B, H, T, Dv); each block is the whole unpadded sequence (Mosaic takes
a block dimension equal to the array's); masked keys get no weight. Padding the
sequence to a lane-width would cost pads and transposes around the kernel
(docs/experiments.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from asda_jax import hardware, sharding

MAX_LENGTH = hardware.LANES  # the whole sequence is one block: one tile of rows at most
_NEG = -1e30  # logit of a key that takes no weight (finite: exp gives exactly 0)
_PARTIAL_TILE = (8, hardware.LANES)  # each (example, head)'s dλ partial: one vector tile


def differential_attention(q1, k1, q2, k2, v, lam, mask=None, *, interpret=False):
    """(softmax(q1k1ᵀ/√Dk) − λ·softmax(q2k2ᵀ/√Dk)) v on (B, T, H, D) inputs, T ≤ MAX_LENGTH,
    λ of shape (H,), ``mask`` (B, T) True for real keys: (B, T, H, Dv)."""
    qk = jnp.stack([q1, q2, k1, k2], axis=2)
    return fused_projection_attention(qk, v, lam, mask, interpret=interpret)


def fused_projection_attention(qk, v, lam, mask=None, *, interpret=False):
    """The same of the release's fused projection ``qk`` (B, T, 4, H, Dk), its four parts
    [q1 | q2 | k1 | k2], read as it is: the projection's output is laid out (4, B, H, T, Dk)
    by the TPU compiler, so no part is copied out of it, going forward or back."""
    length = qk.shape[1]
    if length > MAX_LENGTH:
        raise ValueError(f"short attention takes at most {MAX_LENGTH} tokens, got {length}")
    valid = jnp.ones(qk.shape[:2], bool) if mask is None else mask
    valid = valid[:, None, :].astype(jnp.float32)  # (B, 1, T)
    out = _attend(qk.transpose(2, 0, 3, 1, 4), v.transpose(0, 2, 1, 3), lam, valid, interpret)
    return out.transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(qk, v, lam, valid, interpret):  # (4, B, H, T, Dk), (B, H, T, Dv) -> (B, H, T, Dv)
    return _forward(qk, v, lam, valid, interpret)


def _attend_fwd(qk, v, lam, valid, interpret):
    return _forward(qk, v, lam, valid, interpret), (qk, v, lam, valid)  # maps recomputed


def _attend_bwd(interpret, residuals, d_out):
    d_qk, dv, d_lam = _backward(*residuals, d_out, interpret)
    return d_qk, dv, d_lam[:, :, 0, 0].sum(0), None


_attend.defvjp(_attend_fwd, _attend_bwd)


# ----------------------------------------------------------------------------- kernels


def _probs(q, k, valid, scale):  # (T, Dk) × 2, (1, T) -> (T, T) float32 softmax
    logits = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    logits = jnp.where(valid > 0, logits * scale, _NEG)
    e = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
    return e / jnp.sum(e, axis=1, keepdims=True)


def _transposed_product(a, b):  # aᵀ b: (T, T) × (T, D) -> (T, D) float32
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _forward_kernel(lam_ref, qk, v, valid, out, *, scale):
    lam = lam_ref[pl.program_id(1)]
    mixed = _probs(qk[0], qk[2], valid[...], scale) - lam * _probs(qk[1], qk[3], valid[...], scale)
    out[...] = jnp.dot(mixed.astype(v.dtype), v[...], preferred_element_type=jnp.float32).astype(
        out.dtype
    )


def _backward_kernel(lam_ref, qk, v, d_out, valid, d_qk, dv, d_lam, *, scale):
    lam = lam_ref[pl.program_id(1)]
    q1, q2, k1, k2 = qk[0], qk[1], qk[2], qk[3]
    p1 = _probs(q1, k1, valid[...], scale)
    p2 = _probs(q2, k2, valid[...], scale)
    do = d_out[...]
    dv[...] = _transposed_product((p1 - lam * p2).astype(do.dtype), do).astype(dv.dtype)
    g = jax.lax.dot_general(
        do, v[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # dL/d(mixed map)
    for branch, (p, coeff, q, k) in enumerate(((p1, 1.0, q1, k1), (p2, -lam, q2, k2))):
        rowsum = jnp.sum(g * p, axis=1, keepdims=True)  # (T, 1)
        u = (p * (g - rowsum) * (coeff * scale)).astype(q.dtype)  # d logits, scaled
        d_qk[branch] = jnp.dot(u, k, preferred_element_type=jnp.float32).astype(d_qk.dtype)
        d_qk[2 + branch] = _transposed_product(u, q).astype(d_qk.dtype)
    # d(−λ·A2)/dλ = −A2: dλ = −Σ G⊙A2 over the map = −Σ rowsum of branch 2
    d_lam[...] = jnp.broadcast_to(-jnp.sum(rowsum), d_lam.shape)


def _block(shape):
    """One (example, head)'s block of a (B, H, ...) array, or of all four parts of a
    (4, B, H, T, D) one."""
    if len(shape) == 5:
        return pl.BlockSpec((shape[0], None, None, *shape[3:]), lambda b, h: (0, b, h, 0, 0))
    return pl.BlockSpec((None, None, *shape[2:]), lambda b, h: (b, h, 0, 0))


def _cost(blocks, valid, shapes, maps_products: int) -> pl.CostEstimate:
    """What one device's call does, for the compiler's cost analysis (a Pallas call
    counts nothing unless it says): ``maps_products`` products of a (T, T) map and a
    head's width (QKᵀ, map·V, ...) per (example, head), two maps' exponentials, and
    its arrays read and written once."""
    batch, heads, length, width = blocks[-1].shape  # v (or d_out): (B, H, T, Dv)
    moved = sum(a.size * a.dtype.itemsize for a in [*blocks, valid, *shapes])
    per_head = maps_products * 2 * length * length * width
    return pl.CostEstimate(
        flops=batch * heads * per_head,
        transcendentals=batch * heads * 2 * length * length,
        bytes_accessed=moved,
    )


def _call(kernel, out_shape, lam, *arrays, interpret, maps_products):
    """``kernel`` over the (example, head) grid, each device on its own examples and
    heads. ``arrays``: the blocked inputs, then the (B, 1, T) key weights;
    ``out_shape``: (global shape, dtype) pairs; ``maps_products``: for ``_cost``."""

    def run(lam, *arrays):
        *blocks, valid = arrays
        batch, heads = valid.shape[0], lam.shape[0]  # this device's
        shapes = [jax.ShapeDtypeStruct((*s[:-4], batch, heads, *s[-2:]), d) for s, d in out_shape]
        call = pl.pallas_call(
            kernel,
            grid=(batch, heads),
            in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)]
            + [_block(x.shape) for x in blocks]
            + [pl.BlockSpec((None, *valid.shape[1:]), lambda b, h: (b, 0, 0))],
            out_specs=[_block(s.shape) for s in shapes],
            out_shape=shapes,
            cost_estimate=_cost(blocks, valid, shapes, maps_products),
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
            interpret=pltpu.InterpretParams() if interpret else False,
        )
        return tuple(call(lam, *blocks, valid))

    heads = sharding.split("batch", "heads", "length", "head_dim")
    by_rank = {4: heads, 5: sharding.split(None, *heads.names)}
    in_splits = (
        sharding.split("heads"),
        *[by_rank[x.ndim] for x in arrays[:-1]],
        sharding.split("batch", None, None),
    )
    out_splits = tuple(by_rank[len(s)] for s, _ in out_shape)
    return sharding.per_device(run, in_splits, out_splits, check_vma=False)(lam, *arrays)


def _scale(qk):
    return 1.0 / qk.shape[-1] ** 0.5


def _forward(qk, v, lam, valid, interpret):  # -> (B, H, T, Dv)
    kernel = functools.partial(_forward_kernel, scale=_scale(qk))
    # each branch's QKᵀ and the mixed map times V
    (out,) = _call(
        kernel, [(v.shape, v.dtype)], lam, qk, v, valid, interpret=interpret, maps_products=3
    )
    return out


def _backward(qk, v, lam, valid, d_out, interpret):  # -> d_qk, dv, dλ partials
    kernel = functools.partial(_backward_kernel, scale=_scale(qk))
    batch, heads = v.shape[:2]
    shapes = [
        (qk.shape, qk.dtype),
        (v.shape, v.dtype),
        ((batch, heads, *_PARTIAL_TILE), jnp.float32),
    ]
    # d_out rides with the blocked inputs; valid stays last. Both QKᵀ recomputed, dV and
    # dL/dmap, each branch's dQ and dK
    return _call(kernel, shapes, lam, qk, v, d_out, valid, interpret=interpret, maps_products=8)
