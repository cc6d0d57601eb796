"""The ASDA encoder and its classification head, as Flax modules.

The encoder follows the authors' release (``docs/method.md``):

    spectrogram (B, T, 128) → 16×16 patches (B, N, D) + fixed 2-D sin-cos positions
    → [keep a subset of patches] → prepend CLS (no position) → LayerNorm
    → ``depth`` post-norm differential-attention blocks (no final norm)

Every parameter carries logical axis names (``sharding.LOGICAL_AXIS_RULES``). Modules
are used only through ``apply``; parameters are a plain dict. To see attention maps,
apply with ``mutable=["intermediates"]``: each attention layer then runs the
``reference`` backend and sows its maps as ``attention_maps`` (B, branches, H, T, T).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asda_jax import attention as attn_lib
from asda_jax import sharding
from asda_jax.kernels import mlp as mlp_kernel
from asda_jax.model.config import KERNEL_FORM, REMAT_POLICIES, Execution, ModelConfig
from asda_jax.model.layers import (
    Dense,
    gelu,
    layer_norm,
    linear,
    named,
    ones,
    torch_default_init,
)


@functools.cache
def sincos_table(time_patches: int, freq_patches: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos table (time_patches·freq_patches, dim) in float32.

    Row r = t·F + f holds [e(f) | e(t)]: the first half encodes the frequency patch
    index, the second the time index, with e(p) = [sin(p·ω), cos(p·ω)] and
    ω_i = 10000^(−i/(dim/4)). Built from float32 arguments, as the release was.
    """
    quarter = dim // 4
    omega = 1.0 / np.float32(10000) ** (np.arange(quarter, dtype=np.float32) / np.float32(quarter))

    def encode(positions: np.ndarray) -> np.ndarray:  # (N,) -> (N, dim/2)
        angles = np.outer(positions.astype(np.float32), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    t, f = np.meshgrid(np.arange(time_patches), np.arange(freq_patches), indexing="ij")
    return np.concatenate([encode(f.ravel()), encode(t.ravel())], axis=1).astype(np.float32)


def sincos_positions(cfg: ModelConfig, time_patches: int) -> np.ndarray:
    """The first ``time_patches`` time rows of the table for ``max_time_patches``."""
    if time_patches > cfg.max_time_patches:
        max_frames = cfg.max_time_patches * cfg.patch_size
        raise ValueError(
            f"input has {time_patches} time patches ({time_patches * cfg.patch_size} frames); "
            f"the positional table holds {cfg.max_time_patches} ({max_frames} frames)"
        )
    table = sincos_table(cfg.max_time_patches, cfg.freq_patches, cfg.embed_dim)
    return table[: time_patches * cfg.freq_patches]


def token_mask(
    frame_lengths: jax.Array, time_patches: int, cfg: ModelConfig
) -> jax.Array:  # (B, 1 + N) bool
    """Which tokens (CLS first, then patches time-major) hold real audio."""
    valid_patches = (frame_lengths // cfg.patch_size) * cfg.freq_patches  # (B,)
    patch_ids = jnp.arange(time_patches * cfg.freq_patches)
    patches = patch_ids[None, :] < valid_patches[:, None]
    return jnp.concatenate([jnp.ones_like(patches[:, :1]), patches], axis=1)


class PatchEmbed(nn.Module):
    """(B, T, F) spectrogram → (B, T//p · F//p, D) tokens, time-major, plus positions."""

    cfg: ModelConfig
    run: Execution = Execution()

    @nn.compact
    def __call__(self, spec: jax.Array) -> jax.Array:
        c = self.cfg
        if spec.ndim != 3 or spec.shape[-1] != c.num_mel_bins:
            raise ValueError(f"expected (batch, frames, {c.num_mel_bins}) input, got {spec.shape}")
        # Xavier-uniform of the kernel seen as (D, p·p), as the release initialises it.
        xavier = nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
        )
        p = c.patch_size
        x = nn.Conv(
            c.embed_dim,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.run.compute_dtype,
            kernel_init=named(xavier, ("conv_time", "conv_freq", "conv_in", "embed")),
            bias_init=named(torch_default_init(p * p), ("embed",)),
            name="proj",
        )(spec[..., None].astype(self.run.compute_dtype))  # (B, Nt, Nf, D)
        batch, time_patches, freq_patches, dim = x.shape
        x = x.reshape(batch, time_patches * freq_patches, dim)
        return x + jnp.asarray(sincos_positions(c, time_patches), x.dtype)


# ---------------------------------------------------------------------------- attention


def _attention_options(run: Execution) -> dict:
    """How the run's attention calls run: its backend request, chip and kernel mode."""
    return dict(
        implementation=run.attention_impl, chip=run.hardware, interpret=run.interpret_kernels
    )


HEAD_AXES = ("batch", "length", "heads", "head_dim")  # logical axes of per-head activations
OUT_AXES = ("heads", "head_dim", "embed")  # the output projection's kernel


def _sown_differential(module: nn.Module, q1, k1, q2, k2, v, lam, mask):
    """Differential attention through ``reference``, its two maps sown as
    ``attention_maps`` (B, 2, H, T, T)."""
    out, maps = attn_lib.differential_attention(q1, k1, q2, k2, v, lam, mask=mask, return_maps=True)
    module.sow("intermediates", "attention_maps", jnp.stack(maps, axis=1))
    return out


class AsdaAttention(nn.Module):
    """Release form: qk → [q1 | q2 | k1 | k2], v; (A1 − λA2)v; LayerNorm over all heads × 0.95."""

    cfg: ModelConfig
    run: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:  # (B, T, D)
        c, dtype = self.cfg, self.run.compute_dtype
        heads = (c.num_heads, c.head_dim)
        qk_axes = ("embed", "qk_group", "heads", "head_dim")
        qk = linear(x, *Dense((c.embed_dim,), (4, *heads), qk_axes, name="qk")(), dtype)
        v = linear(
            x, *Dense((c.embed_dim,), heads, ("embed", "heads", "head_dim"), name="v")(), dtype
        )
        qk = sharding.constrain(
            qk, ("batch", "length", "qk_group", "heads", "head_dim")
        )  # (B, T, 4, H, Dh)
        v = sharding.constrain(v, HEAD_AXES)
        if self.is_mutable_collection("intermediates"):
            q1, q2, k1, k2 = (qk[:, :, i] for i in range(4))
            o = _sown_differential(self, q1, k1, q2, k2, v, c.diff_lambda, mask)
        else:
            o = attn_lib.fused_projection_attention(
                qk, v, c.diff_lambda, mask=mask, **_attention_options(self.run)
            )
        o = layer_norm(1e-5, dtype, axes=("heads", "head_dim"), name="norm")(o)
        o = o * c.attn_out_scale
        proj = Dense(heads, (c.embed_dim,), OUT_AXES, name="proj")()
        return linear(o, *proj, dtype, contract=2)


def lambda_init(layer_index: int) -> float:
    """DIFF Transformer's λ_init for a 0-based layer index: 0.8 − 0.6·exp(−0.3·l)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class DiffTransformerAttention(nn.Module):
    """Paper / DIFF-Transformer form (Ye et al. 2024) at the same width.

    H = num_heads/2 differential heads; q and k sub-heads of width d = D/num_heads
    interleaved per head, v heads of width 2d, no biases. Learnable
    λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init(l), shared by the heads of a layer;
    each head's output is RMS-normalised and scaled by (1 − λ_init(l)).
    """

    cfg: ModelConfig
    layer_index: int
    run: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        c, dtype = self.cfg, self.run.compute_dtype
        heads, d = c.num_heads // 2, c.head_dim
        dense = functools.partial(Dense, (c.embed_dim,), use_bias=False)
        pair_axes = ("embed", "heads", "qk_group", "head_dim")
        q = linear(x, *dense((heads, 2, d), pair_axes, name="q")(), dtype)  # (B, T, H, 2, d)
        k = linear(x, *dense((heads, 2, d), pair_axes, name="k")(), dtype)
        v_axes = ("embed", "heads", "head_dim")
        v = linear(x, *dense((heads, 2 * d), v_axes, name="v")(), dtype)  # (B, T, H, 2d)
        init = lambda_init(self.layer_index)
        lam_params = [
            self.param(n, named(nn.initializers.normal(0.1), ("head_dim",)), (d,))
            for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
        ]
        lq1, lk1, lq2, lk2 = lam_params
        lam = jnp.exp(jnp.sum(lq1 * lk1)) - jnp.exp(jnp.sum(lq2 * lk2)) + init
        q1, k1, q2, k2 = q[:, :, :, 0], k[:, :, :, 0], q[:, :, :, 1], k[:, :, :, 1]
        if self.is_mutable_collection("intermediates"):
            o = _sown_differential(self, q1, k1, q2, k2, v, lam, mask)
        else:
            o = attn_lib.differential_attention(
                q1, k1, q2, k2, v, lam, mask=mask, **_attention_options(self.run)
            )
        o = nn.RMSNorm(
            epsilon=1e-5, dtype=dtype, scale_init=named(ones, ("head_dim",)), name="subln"
        )(o)
        o = o * (1.0 - init)
        out_proj = Dense((heads, 2 * d), (c.embed_dim,), OUT_AXES, use_bias=False, name="out_proj")
        return linear(o, *out_proj(), dtype, contract=2)


class PlainAttention(nn.Module):
    """Standard multi-head attention (EAT / data2vec 2.0 layout): the baseline."""

    cfg: ModelConfig
    run: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        c, dtype = self.cfg, self.run.compute_dtype
        heads = (c.num_heads, c.head_dim)
        qkv_axes = ("embed", "qk_group", "heads", "head_dim")
        qkv = linear(x, *Dense((c.embed_dim,), (3, *heads), qkv_axes, name="qkv")(), dtype)
        q, k, v = (sharding.constrain(qkv[:, :, i], HEAD_AXES) for i in range(3))
        if self.is_mutable_collection("intermediates"):
            o, a = attn_lib.dot_product_attention(q, k, v, mask=mask, return_maps=True)
            self.sow("intermediates", "attention_maps", a[:, None])
        else:
            o = attn_lib.dot_product_attention(q, k, v, mask=mask, **_attention_options(self.run))
        return linear(o, *Dense(heads, (c.embed_dim,), OUT_AXES, name="proj")(), dtype, contract=2)


def make_attention(cfg: ModelConfig, run: Execution, layer_index: int) -> nn.Module:
    if cfg.attention == "asda":
        return AsdaAttention(cfg, run, name="attn")
    if cfg.attention == "diff":
        return DiffTransformerAttention(cfg, layer_index, run, name="attn")
    return PlainAttention(cfg, run, name="attn")


# ---------------------------------------------------------------------------- blocks


def mlp(x, w1, b1, w2, b2, dtype) -> jax.Array:  # (B, T, D) -> (B, T, D)
    """fc2(gelu(fc1(x))), the XLA form (the Pallas form: ``kernels.mlp.mlp``)."""
    h = sharding.constrain(gelu(linear(x, w1, b1, dtype)), ("batch", "length", "mlp"))
    return linear(h, w2, b2, dtype)


class Mlp(nn.Module):
    cfg: ModelConfig
    run: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, run, dtype = self.cfg, self.run, self.run.compute_dtype
        w1, b1 = Dense((c.embed_dim,), (c.mlp_dim,), ("embed", "mlp"), name="fc1")()
        w2, b2 = Dense((c.mlp_dim,), (c.embed_dim,), ("mlp", "embed"), name="fc2")()
        if run.mlp == KERNEL_FORM:
            return mlp_kernel.mlp(
                x.astype(dtype), w1, b1, w2, b2,
                vmem_bytes=run.hardware.kernel_vmem_bytes, cores=run.hardware.cores_per_device,
                interpret=run.interpret_kernels,
            )  # fmt: skip
        return mlp(x, w1, b1, w2, b2, dtype)


class Block(nn.Module):
    """Post-norm block; returns (output, MLP output before the residual = teacher target)."""

    cfg: ModelConfig
    layer_index: int
    drop_path: float = 0.0
    run: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool):
        c, dtype = self.cfg, self.run.compute_dtype
        # Per-example stochastic depth: one Bernoulli draw per row of the batch.
        drop_path = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
        a = make_attention(c, self.run, self.layer_index)(x, mask)
        x = layer_norm(1e-6, dtype, name="norm1")(x + drop_path(a))
        f = Mlp(c, self.run, name="mlp")(x)
        x = layer_norm(1e-6, dtype, name="norm2")(x + drop_path(f))
        return sharding.constrain(x, ("batch", "length", "act_embed")), f


def block_class(run: Execution) -> type[Block]:
    """``Block``, rematerialised as ``run.remat_policy`` says (the encoder's blocks)."""
    if run.remat_policy == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[run.remat_policy], static_argnums=(3,))


class EncoderOutput(NamedTuple):
    tokens: jax.Array  # (B, 1 + N, D): CLS, then patches
    layer_results: tuple[jax.Array, ...]  # per block (B, 1 + N, D): MLP output
    mask: jax.Array | None  # (B, 1 + N) bool, or None when every token is real


class Encoder(nn.Module):
    """Patch embedding, CLS, context LayerNorm and the differential blocks."""

    cfg: ModelConfig
    run: Execution = Execution()

    def setup(self):
        c, run = self.cfg, self.run
        self.patch_embed = PatchEmbed(c, run)
        self.cls_token = self.param(
            "cls_token",
            named(nn.initializers.normal(1.0), (None, None, "norm")),
            (1, 1, c.embed_dim),
        )
        self.context_norm = layer_norm(1e-6, run.compute_dtype)
        block = block_class(run)
        rates = np.linspace(0.0, c.drop_path, c.depth) if c.depth > 1 else [c.drop_path]
        self.blocks = [block(c, i, float(rates[i]), run) for i in range(c.depth)]

    def embed(self, spec: jax.Array) -> jax.Array:
        """(B, T, F) → (B, N, D) patch tokens with positions (T floored to the patch)."""
        return self.patch_embed(spec)

    def contextualize(
        self, patches: jax.Array, mask: jax.Array | None = None, train: bool = False
    ) -> EncoderOutput:
        """Prepends CLS to (B, N, D) patch tokens and runs the norm and blocks."""
        batch = patches.shape[0]
        cls = jnp.broadcast_to(self.cls_token.astype(patches.dtype), (batch, 1, patches.shape[-1]))
        x = self.context_norm(jnp.concatenate([cls, patches], axis=1))
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        layer_results = []
        for block in self.blocks:
            x, f = block(x, mask, train)
            layer_results.append(f)
        return EncoderOutput(x, tuple(layer_results), mask)

    def __call__(
        self, spec: jax.Array, frame_lengths: jax.Array | None = None, train: bool = False
    ) -> EncoderOutput:
        """Encodes a (B, T, F) batch; ``frame_lengths`` (B,) masks trailing padding."""
        patches = self.embed(spec)
        mask = None
        if frame_lengths is not None:
            time_patches = patches.shape[1] // self.cfg.freq_patches
            mask = token_mask(frame_lengths, time_patches, self.cfg)
        return self.contextualize(patches, mask, train)


def pool(out: EncoderOutput, pooling: str) -> jax.Array:  # (B, D)
    """CLS token, or the mean of the real patch tokens."""
    if pooling == "cls":
        return out.tokens[:, 0]
    if pooling == "mean":
        patches = out.tokens[:, 1:]
        if out.mask is None:
            return patches.mean(axis=1)
        weights = out.mask[:, 1:, None].astype(patches.dtype)
        return (patches * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")


class Classifier(nn.Module):
    """Encoder → pooled token → LayerNorm (``fc_norm``) → Linear (``head``): logits."""

    cfg: ModelConfig
    num_classes: int
    pooling: str = "cls"
    run: Execution = Execution()

    @nn.compact
    def __call__(
        self, spec: jax.Array, frame_lengths: jax.Array | None = None, train: bool = False
    ) -> jax.Array:  # (B, num_classes) float32
        dtype = self.run.compute_dtype
        out = Encoder(self.cfg, self.run, name="encoder")(spec, frame_lengths, train)
        pooled = layer_norm(1e-6, dtype, name="fc_norm")(pool(out, self.pooling))
        head = Dense(
            (self.cfg.embed_dim,),
            (self.num_classes,),
            ("embed", "classes"),
            kernel_init=nn.initializers.truncated_normal(0.02),
            name="head",
        )
        return linear(pooled, *head(), dtype).astype(jnp.float32)
