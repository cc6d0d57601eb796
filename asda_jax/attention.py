"""Differential attention as one pure function with swappable kernel backends.

    out = softmax(s·q1 k1ᵀ) v − λ · softmax(s·q2 k2ᵀ) v,      s = 1/√d_qk

Both forms of ASDA's attention share this core; they differ only in how q/k/v and λ
are produced and how the heads are normalised afterwards (``asda_jax/model/encoder.py``).

Backends (one signature). ``implementation="auto"`` takes the rule of the chip the
program is for (``hardware.Chip.attention``, passed as ``chip``) and the call's length,
dtype and head width; an explicit backend that cannot run a call raises:

=============== ============================================================== ==========
name            what runs                                                      where
=============== ============================================================== ==========
reference       the formula as written, differentiated by JAX: both softmax    everywhere
                maps, then A·V with A = A1 − λA2; the tests' oracle, and the
                only backend that returns maps
xla             the same maps and one A·V, mixed in one pass from the          everywhere
                unnormalised exponentials, with a hand-written backward
cudnn           two ``jax.nn.dot_product_attention`` calls through cuDNN       GPU, bf16/fp16
                sharing V (odd lengths padded by one masked token:
                ``_cudnn_attention``)
pallas_splash   two Pallas TPU splash-attention calls sharing V               TPU (CPU: interpret)
pallas_short    differential attention only, at most one lane-width of        TPU (CPU: interpret)
                tokens: both branches in one Pallas kernel per (example,
                head), the maps only in VMEM, recomputed in the backward
                (``kernels/short_attention.py``)
=============== ============================================================== ==========

Because (A1 − λA2)v = A1·v − λ·(A2·v), the fused backends never materialise a T×T
map. ``interpret=True`` runs the Pallas kernels in interpret mode (tests on CPU).

Layout: q, k, v are (B, T, H, D) as in ``jax.nn.dot_product_attention``. Padding is a
boolean key mask (B, T), True for real tokens. Padding must be trailing (as produced by
variable-length batching): the cuDNN backend passes it on as sequence lengths.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from absl import logging

from asda_jax import hardware, sharding
from asda_jax.kernels import short_attention

BACKENDS = ("reference", "xla", "cudnn", "pallas_splash", "pallas_short")
CUDNN_HEAD_DIM_MULTIPLE = 8
CUDNN_LENGTH_MULTIPLE = 2  # differentiated calls (see _cudnn_attention)
HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def _softmax_factors(
    q: jax.Array,  # (B, H, Tq, D)
    k: jax.Array,  # (B, H, Tk, D)
    mask: jax.Array | None,  # (B, Tk) bool
) -> tuple[jax.Array, jax.Array]:  # (B, H, Tq, Tk), (B, H, Tq, 1) float32
    """softmax(q kᵀ / √D) in float32 left unnormalised: exp(logits − row max) and 1 / its
    row sum, with padded keys given zero weight.

    Keeping the two factors lets a caller fold the normalisation into a later pass
    over the map instead of spending a read and a write of the whole map on it.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    exps = jnp.exp(logits - row_max)
    return exps, 1.0 / jnp.sum(exps, axis=-1, keepdims=True)


def differential_attention(
    q1: jax.Array,  # (B, T, H, Dk)
    k1: jax.Array,  # (B, T, H, Dk)
    q2: jax.Array,  # (B, T, H, Dk)
    k2: jax.Array,  # (B, T, H, Dk)
    v: jax.Array,  # (B, T, H, Dv)
    lam: jax.Array | float,  # scalar or (H,)
    *,
    mask: jax.Array | None = None,  # (B, T) bool, True = real token
    implementation: str = "auto",
    chip: hardware.Chip = hardware.HOST,
    interpret: bool = False,
    return_maps: bool = False,
) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(softmax(q1k1ᵀ/√Dk) − λ·softmax(q2k2ᵀ/√Dk)) v, per head: (B, T, H, Dv).

    With ``return_maps`` also returns the two softmax maps (A1, A2), each
    (B, H, T, T) float32; that always runs the ``reference`` backend.
    """
    backend = _backend_for(implementation, chip, q1, v, return_maps, interpret, branches=2)
    lam = _per_head(lam, q1.shape[2])
    return _differential(backend, q1, k1, q2, k2, v, lam, mask, interpret, return_maps)


def _differential(backend, q1, k1, q2, k2, v, lam, mask, interpret, return_maps=False):
    """``differential_attention`` by the ``backend`` already chosen, λ per head."""
    if backend == "pallas_short":
        return short_attention.differential_attention(
            q1, k1, q2, k2, v, lam, mask, interpret=interpret
        )  # in v's dtype
    if backend in ("reference", "xla"):
        coeffs = jnp.stack([jnp.ones_like(lam), -lam])  # (2, H)
        qs, ks = (_heads_first(q1), _heads_first(q2)), (_heads_first(k1), _heads_first(k2))
        return _materialised(backend, qs, ks, v, coeffs, mask, return_maps)
    attend = functools.partial(_fused_attention, backend, mask=mask, interpret=interpret)
    o1, o2 = attend(q1, k1, v), attend(q2, k2, v)
    return (o1 - lam[:, None] * o2).astype(v.dtype)


def _per_head(lam: jax.Array | float, heads: int) -> jax.Array:  # (H,) float32
    return jnp.broadcast_to(jnp.asarray(lam, jnp.float32), (heads,))


def fused_projection_attention(
    qk: jax.Array,  # (B, T, 4, H, Dk): [q1 | q2 | k1 | k2], the release's fused projection
    v: jax.Array,  # (B, T, H, Dv)
    lam: jax.Array | float,
    *,
    mask: jax.Array | None = None,
    implementation: str = "auto",
    chip: hardware.Chip = hardware.HOST,
    interpret: bool = False,
) -> jax.Array:
    """``differential_attention`` of the four parts of one projection: the short kernel
    reads ``qk`` whole (splitting it would copy every part each way); every other
    backend gets the parts."""
    q1, q2, k1, k2 = (qk[:, :, i] for i in range(4))
    backend = _backend_for(implementation, chip, q1, v, False, interpret, branches=2)
    lam = _per_head(lam, qk.shape[3])
    if backend == "pallas_short":
        return short_attention.fused_projection_attention(qk, v, lam, mask, interpret=interpret)
    return _differential(backend, q1, k1, q2, k2, v, lam, mask, interpret)


def dot_product_attention(
    q: jax.Array,  # (B, T, H, D)
    k: jax.Array,  # (B, T, H, D)
    v: jax.Array,  # (B, T, H, Dv)
    *,
    mask: jax.Array | None = None,
    implementation: str = "auto",
    chip: hardware.Chip = hardware.HOST,
    interpret: bool = False,
    return_maps: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Plain softmax attention behind the same backends: (B, T, H, Dv); with
    ``return_maps`` also its (B, H, T, T) map."""
    backend = _backend_for(implementation, chip, q, v, return_maps, interpret, branches=1)
    if backend in ("reference", "xla"):
        out = _materialised(
            backend, (_heads_first(q),), (_heads_first(k),), v, None, mask, return_maps
        )
        return (out[0], out[1][0]) if return_maps else out
    return _fused_attention(backend, q, k, v, mask=mask, interpret=interpret)


_CHOICES: contextvars.ContextVar[list | None] = contextvars.ContextVar("choices", default=None)


@contextlib.contextmanager
def recorded_choices() -> Iterator[list[tuple[int, str]]]:
    """Collects (sequence length, backend) of every attention call traced inside: what
    a compiled program runs, for reports (``aot``)."""
    choices: list[tuple[int, str]] = []
    token = _CHOICES.set(choices)
    try:
        yield choices
    finally:
        _CHOICES.reset(token)


def _backend_for(implementation, chip, q, v, return_maps, interpret, branches) -> str:
    backend = choose_backend(
        implementation,
        chip=chip,
        dtype=q.dtype,
        head_dim=max(q.shape[-1], v.shape[-1]),
        length=q.shape[1],
        need_maps=return_maps,
        interpret=interpret,
        branches=branches,
    )
    if (choices := _CHOICES.get()) is not None:
        choices.append((q.shape[1], backend))
    return backend


# ----------------------------------------------------------------------------- choosing


def choose_backend(
    implementation: str,
    *,
    chip: hardware.Chip,
    dtype,
    head_dim: int,
    length: int,
    need_maps: bool = False,
    interpret: bool = False,
    branches: int = 2,
) -> str:
    """The backend of a call of ``branches`` softmaxes (2: differential, 1: plain) on
    ``chip``: an explicit ``implementation`` if it can run the call (else ValueError
    saying why), or for ``"auto"`` the chip's rule (``hardware.AttentionRule``), giving
    way to ``xla`` where the rule's backend cannot run the call. Maps need
    ``reference``."""
    if implementation != "auto" and implementation not in BACKENDS:
        raise ValueError(f"unknown attention implementation {implementation!r}; one of {BACKENDS}")
    if need_maps:
        return "reference"
    call = (chip, dtype, head_dim, length, branches, interpret)
    if implementation != "auto":
        reason = why_not(implementation, *call)
        if reason is not None:
            raise ValueError(f"attention_impl {implementation!r} cannot run here: {reason}")
        return implementation
    rule = chip.attention
    short = rule.short if branches == 2 else "xla"
    wanted = rule.long if length >= rule.long_from else short
    chosen = wanted if why_not(wanted, *call) is None else "xla"
    _log_choice(chip.name, length, branches, chosen)
    return chosen


def why_not(backend, chip, dtype, head_dim, length, branches, interpret) -> str | None:
    """Why ``backend`` cannot run a call on ``chip``, or None where it can."""
    if backend == "cudnn":
        if chip.platform != "gpu":
            return f"cuDNN needs a GPU, this is {chip.description}"
        half = jnp.dtype(dtype) in [jnp.dtype(d) for d in HALF_DTYPES]
        widest = chip.attention.max_head_dim or 0
        if not half or head_dim > widest or head_dim % CUDNN_HEAD_DIM_MULTIPLE:
            return (
                f"cuDNN on {chip.description} needs bf16/fp16 and a head dim <= {widest}, "
                f"a multiple of {CUDNN_HEAD_DIM_MULTIPLE} (got {jnp.dtype(dtype).name}, "
                f"{head_dim})"
            )
    if backend.startswith("pallas") and chip.platform != "tpu" and not interpret:
        return f"Pallas TPU kernels need a TPU (or interpret=True), this is {chip.description}"
    if backend == "pallas_short" and (length > short_attention.MAX_LENGTH or branches != 2):
        return (
            f"the short kernel takes differential attention over at most "
            f"{short_attention.MAX_LENGTH} tokens (got {length} tokens, {branches} branches)"
        )
    return None


@functools.cache
def _log_choice(chip: str, length: int, branches: int, backend: str) -> None:
    kind = "differential" if branches == 2 else "plain"
    logging.info(
        "attention on %s: %s attention over %d tokens runs %r", chip, kind, length, backend
    )


# ----------------------------------------------------------------------------- the XLA forms


def _heads_first(x: jax.Array) -> jax.Array:
    """(B, T, H, D) ↔ (B, H, T, D)."""
    return x.transpose(0, 2, 1, 3)


def _materialised(backend, qs, ks, v, coeffs, mask, return_maps):
    """The ``reference`` or ``xla`` backend on (B, H, T, D) queries and keys and a
    (B, T, H, D) V: (B, T, H, Dv), and with ``return_maps`` the softmax maps."""
    v = _heads_first(v)
    if backend == "xla":
        return _heads_first(_softmax_mixture(qs, ks, v, coeffs, mask))
    out, maps = _reference_mixture(qs, ks, v, coeffs, mask)
    return (_heads_first(out), maps) if return_maps else _heads_first(out)


def _reference_mixture(qs, ks, v, coeffs, mask):
    """o = Σ_j c_j softmax(q_j k_jᵀ/√D) v as the formula reads (B, H, T, D), and the maps
    (float32); ``coeffs=None`` is one branch with coefficient 1."""
    maps = tuple(_normalised(*_softmax_factors(q, k, mask)) for q, k in zip(qs, ks, strict=True))
    weights = [1.0] if coeffs is None else [c[:, None, None] for c in coeffs]
    mixed = sum(w * a for w, a in zip(weights, maps, strict=True))
    return jnp.einsum("bhqk,bhkd->bhqd", mixed.astype(v.dtype), v), maps


def _mixture_forward(qs, ks, v, coeffs, mask):
    """The ``xla`` backend's forward: o = A·v with A = Σ_j c_j softmax(q_j k_jᵀ/√D), in
    (B, H, T, D) layout.

    Returns (o, probs, A) where softmax_j = e_j · r_j for probs[j] = (e_j, r_j), r_j
    (B, H, T, 1) or None when e_j is already normalised. ``coeffs=None`` means one
    branch with coefficient 1. Two branches are mixed straight from the unnormalised
    exponentials, A = Σ_j (c_j r_j) e_j: one pass over the maps instead of three.
    """
    factors = [_softmax_factors(q, k, mask) for q, k in zip(qs, ks, strict=True)]
    if coeffs is None:
        ((exps, inv_sums),) = factors
        mixed = exps * inv_sums
        probs = [(mixed, None)]
    else:
        mixed = sum((c[:, None, None] * r) * e for c, (e, r) in zip(coeffs, factors, strict=True))
        probs = factors
    out = jnp.einsum("bhqk,bhkd->bhqd", mixed.astype(v.dtype), v)
    return out, probs, mixed


def _normalised(exps: jax.Array, inv_sums: jax.Array | None) -> jax.Array:
    return exps if inv_sums is None else exps * inv_sums


@jax.custom_vjp
def _softmax_mixture(qs, ks, v, coeffs, mask):
    """The ``xla`` backend: softmax maps mixed per head with coefficients, times V.

    One branch with ``coeffs=None`` is plain attention; two with (1, −λ) differential
    attention. The hand-written backward reuses each softmax's row sums r_j = Σ_k G⊙A_j
    for dc_j, and applies per-head coefficients to (T, D) matmul results instead of
    (T, T) maps: XLA CPU would materialise such a broadcast as a T×T buffer. The tests
    hold it to ``reference``'s autodiff.
    """
    return _mixture_forward(qs, ks, v, coeffs, mask)[0]


def _softmax_mixture_fwd(qs, ks, v, coeffs, mask):
    out, probs, mixed = _mixture_forward(qs, ks, v, coeffs, mask)
    # Padding lives on as zeros in the maps; the mixed map is kept for dV.
    return out, (qs, ks, v, coeffs, probs, mixed)


def _softmax_mixture_bwd(residuals, d_out):  # d_out (B, H, T, Dv)
    qs, ks, v, coeffs, probs, mixed = residuals
    scale = 1.0 / math.sqrt(qs[0].shape[-1])
    g = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)  # dL/dA
    d_v = jnp.einsum("bhqk,bhqd->bhkd", mixed.astype(d_out.dtype), d_out)
    factors = [None] * len(probs) if coeffs is None else list(coeffs)
    d_qs, d_ks, d_coeffs = [], [], []
    for c, (exps, inv_sums), q, k in zip(factors, probs, qs, ks, strict=True):
        a = _normalised(exps, inv_sums)  # recomputed inside the fused passes below
        rowsum = jnp.sum(g * a, axis=-1, keepdims=True)  # (B, H, T, 1)
        u = a * (g - rowsum)  # softmax backward, before the branch coefficient
        factor = scale if c is None else (c * scale)[:, None, None]  # per head
        d_qs.append((jnp.einsum("bhqk,bhkd->bhqd", u.astype(q.dtype), k) * factor).astype(q.dtype))
        d_ks.append((jnp.einsum("bhqk,bhqd->bhkd", u.astype(q.dtype), q) * factor).astype(k.dtype))
        if c is not None:
            d_coeffs.append(jnp.sum(rowsum, axis=(0, 2, 3)))  # (H,)
    d_coeffs = None if coeffs is None else jnp.stack(d_coeffs)
    return tuple(d_qs), tuple(d_ks), d_v.astype(v.dtype), d_coeffs, None


_softmax_mixture.defvjp(_softmax_mixture_fwd, _softmax_mixture_bwd)


# ----------------------------------------------------------------------------- fused kernels


def _fused_attention(
    backend: str,
    q: jax.Array,  # (B, T, H, Dk)
    k: jax.Array,  # (B, T, H, Dk)
    v: jax.Array,  # (B, T, H, Dv)
    *,
    mask: jax.Array | None,
    interpret: bool,
) -> jax.Array:  # (B, T, H, Dv)
    """One softmax attention through a fused kernel, heads of q/k padded to V's width."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    q, k = _pad_last(q, v.shape[-1]), _pad_last(k, v.shape[-1])  # zeros leave q·k unchanged
    if backend == "cudnn":
        return _cudnn_attention(q, k, v, mask, scale)
    return _splash_attention(q, k, v, mask, scale, interpret)


def _pad_last(x: jax.Array, width: int) -> jax.Array:
    pad = width - x.shape[-1]
    if pad < 0:
        raise ValueError(f"query/key heads ({x.shape[-1]}) wider than value heads ({width})")
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def _cudnn_attention(q, k, v, mask, scale, implementation: str | None = "cudnn"):
    """cuDNN's fused attention, the key mask passed as sequence lengths.

    Differentiated, cuDNN takes even lengths only: jax.nn hands its backward a bias
    (empty when there is none) and ``check_is_flash_attention`` refuses odd lengths
    with one ("Unsupported sequence length Q 103, KV 103"). An odd sequence is padded
    by one token that the lengths mask as a key and the slice drops as a query.
    ``implementation=None`` runs the same padding through XLA (the tests' check).
    """
    batch, length = q.shape[:2]
    lengths = jnp.full((batch,), length, jnp.int32) if mask is None else mask.sum(-1)
    pad = -length % CUDNN_LENGTH_MULTIPLE
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=lengths.astype(jnp.int32),
        implementation=implementation,
    )  # fmt: skip
    return out[:, :length]


def _splash_attention(q, k, v, mask, scale, interpret) -> jax.Array:
    """Pallas TPU splash attention in its (B, H, T, D) layout on lane-aligned sequences.

    Padding (the caller's and the alignment's) becomes segment id 0, real tokens 1, so a
    real query never attends a padded key. Each device runs the kernel on its own
    examples and heads (a Pallas call cannot be auto-partitioned).
    """
    batch, length = q.shape[:2]
    block = hardware.LANES
    padded = -(-length // block) * block
    valid = jnp.ones((batch, length), bool) if mask is None else mask
    segments = jnp.pad(valid, ((0, 0), (0, padded - length))).astype(jnp.int32)  # (B, Tp)

    def to_kernel_layout(x):  # (B, T, H, D) -> (B, H, Tp, D)
        return jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    heads = sharding.split("batch", "heads", "length", "head_dim")
    run = sharding.per_device(
        functools.partial(_splash, scale=scale, interpret=interpret),
        (heads, heads, heads, sharding.split("batch", None)),
        heads,
        check_vma=False,
    )
    out = run(*(to_kernel_layout(x) for x in (q, k, v)), segments)  # (B, H, Tp, Dv)
    return out[:, :, :length].transpose(0, 2, 1, 3)


def _splash(q, k, v, segments, *, scale, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    heads, length = q.shape[1], q.shape[2]
    full = sm.MultiHeadMask([sm.FullMask((length, length)) for _ in range(heads)])
    kernel = sk.make_splash_mha(full, head_shards=1, q_seq_shards=1, interpret=interpret)

    def one_example(q, k, v, seg):  # (H, Tp, D) each, seg (Tp,)
        return kernel(q * scale, k, v, segment_ids=sk.SegmentIds(q=seg, kv=seg))

    return jax.vmap(one_example)(q, k, v, segments)
