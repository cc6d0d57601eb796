"""Flax modules: the ASDA encoder, its CNN decoder and the classification head.

The encoder follows the authors' release (see ``shared/asda-method.md``):

    spectrogram (B, T, 128) → 16×16 patches (B, N, D) + fixed 2-D sin-cos positions
    → [keep a subset of patches] → prepend CLS (no position) → LayerNorm
    → ``depth`` post-norm differential-attention blocks (no final norm)

``ModelConfig`` is the architecture, what a checkpoint is; ``Execution`` is how it
computes on the devices in use (compute dtype, remat, kernels), never saved with it.
Every parameter carries logical axis names (``sharding.LOGICAL_AXIS_RULES``). Modules
are used only through ``apply``; parameters are a plain dict. To see attention maps,
apply with ``mutable=["intermediates"]``: each attention layer then runs the
``reference`` backend and sows its maps as ``attention_maps`` (B, branches, H, T, T).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asda_jax import attention as attn_lib
from asda_jax import decoder_kernel, mlp_kernel, platforms, sharding

ATTENTION_VARIANTS = ("asda", "diff", "plain")
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
GROUPED_CONV_FORMS = ("xla", "per_device", "taps")  # grouped_conv
DECODER_CONV_FORMS = (*GROUPED_CONV_FORMS, "pallas")  # pallas: the whole block, decoder_kernel
MLP_FORMS = ("xla", "pallas")  # pallas: fc1, GELU and fc2 in one kernel, mlp_kernel


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture (what a checkpoint is); defaults are the release's ViT-Base."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 3.5  # the release hard-codes 3.5 (EAT: 4.0)
    patch_size: int = 16
    num_mel_bins: int = 128
    max_time_patches: int = 768  # 768 × 16 frames ≈ 122.9 s
    attention: str = "asda"  # "asda" (release) | "diff" (DIFF Transformer) | "plain"
    diff_lambda: float = 0.1  # release form: fixed λ
    attn_out_scale: float = 0.95  # release form: output scale (1 − 0.05)
    drop_path: float = 0.0  # largest rate, reached by the last block
    decoder_dim: int = 768
    decoder_layers: int = 6
    decoder_kernel: int = 3
    decoder_groups: int = 16

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def freq_patches(self) -> int:
        return self.num_mel_bins // self.patch_size

    def validate(self) -> ModelConfig:
        """Raises ValueError naming the first inconsistent field."""
        checks = [
            (
                self.attention in ATTENTION_VARIANTS,
                f"attention must be one of {ATTENTION_VARIANTS}",
            ),
            (self.embed_dim % self.num_heads == 0, "embed_dim must divide into num_heads"),
            (
                self.attention != "diff" or self.num_heads % 2 == 0,
                "the diff form pairs heads: num_heads must be even",
            ),
            (self.num_mel_bins % self.patch_size == 0, "num_mel_bins must divide by patch_size"),
            (
                self.decoder_dim % self.decoder_groups == 0
                and self.embed_dim % self.decoder_groups == 0,
                "decoder_dim and embed_dim must divide by decoder_groups",
            ),
            (0.0 <= self.drop_path < 1.0, "drop_path must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid model config: {message} ({self})")
        return self


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a model computes on the devices of ``platform``; "auto" takes the platform's
    form (``platforms.FORMS``). The default is the CPU."""

    platform: str = "cpu"
    dtype: str = "auto"  # compute dtype; parameters stay float32
    remat_policy: str = "none"
    attention_impl: str = "auto"  # per call, by platform and length (choose_backend)
    attention_stack_heads: bool = False
    attention_interpret: bool = False  # run Pallas TPU kernels in interpret mode (tests)
    decoder_conv_impl: str = "auto"  # "auto" or one of DECODER_CONV_FORMS
    mlp_impl: str = "auto"  # "auto" or one of MLP_FORMS

    @property
    def compute_dtype(self):
        dtype = platforms.forms(self.platform).compute_dtype if self.dtype == "auto" else self.dtype
        return DTYPES[dtype]

    @property
    def mlp(self) -> str:
        return platforms.forms(self.platform).mlp if self.mlp_impl == "auto" else self.mlp_impl

    @property
    def decoder_conv(self) -> str:
        if self.decoder_conv_impl == "auto":
            return platforms.forms(self.platform).decoder_conv
        return self.decoder_conv_impl

    def validate(self) -> Execution:
        """Raises ValueError naming the first field this platform cannot run."""
        platforms.forms(self.platform)
        checks = [
            (
                self.dtype == "auto" or self.dtype in DTYPES,
                f"dtype must be 'auto' or in {list(DTYPES)}",
            ),
            (
                self.remat_policy in REMAT_POLICIES,
                f"remat_policy must be in {list(REMAT_POLICIES)}",
            ),
            (
                self.attention_impl == "auto" or self.attention_impl in attn_lib.BACKENDS,
                f"attention_impl must be 'auto' or one of {attn_lib.BACKENDS}",
            ),
            (
                self.decoder_conv_impl == "auto" or self.decoder_conv_impl in DECODER_CONV_FORMS,
                f"decoder_conv_impl must be 'auto' or one of {DECODER_CONV_FORMS}",
            ),
            (
                self.mlp_impl == "auto" or self.mlp_impl in MLP_FORMS,
                f"mlp_impl must be 'auto' or one of {MLP_FORMS}",
            ),
            (
                self.mlp != "pallas" or self.platform == "tpu" or self.attention_interpret,
                "mlp_impl 'pallas' is a TPU kernel: on other platforms only interpreted "
                "(attention_interpret=True, tests)",
            ),
            (
                self.decoder_conv != "pallas" or self.platform == "tpu" or self.attention_interpret,
                "decoder_conv_impl 'pallas' is a TPU kernel: on other platforms only interpreted "
                "(attention_interpret=True, tests)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid execution: {message} ({self})")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "small": dict(embed_dim=384, num_heads=6, decoder_dim=384),
    "demo": dict(
        embed_dim=192, depth=4, num_heads=4, decoder_dim=192, decoder_layers=3, decoder_groups=8
    ),
    "tiny": dict(
        embed_dim=64, depth=2, num_heads=4, decoder_dim=64, decoder_layers=2, decoder_groups=4
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named ModelConfig (``base``, ``small``, ``demo``, ``tiny``) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides}).validate()


# ---------------------------------------------------------------------------- init


def torch_default_init(fan_in: int) -> Callable:
    """U(±1/√fan_in): PyTorch's default for Linear/Conv weights and biases."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


bert_init = nn.initializers.normal(0.02)
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def named(init: Callable, axes: Sequence[str | None]) -> Callable:
    return nn.with_logical_partitioning(init, tuple(axes))


# ---------------------------------------------------------------------------- layers


class Linear(nn.Module):
    """y = x · W + b, contracting the last ``contract`` axes of x into ``features``.

    The kernel keeps the structured shape (inputs…, features…), e.g. (D, 4, H, Dh)
    for the fused q/k projection, so each axis can carry its own logical name.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical names of kernel dims (inputs…, features…)
    contract: int = 1
    use_bias: bool = True
    kernel_init: Callable = bert_init
    bias_init: Callable = zeros
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, weights_only: bool = False):
        """x · W + b, or with ``weights_only`` (W, b) for x (b None without a bias), for a
        kernel that does the product itself."""
        in_shape = x.shape[x.ndim - self.contract :]
        kernel = self.param(
            "kernel", named(self.kernel_init, self.axes), (*in_shape, *self.features)
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias", named(self.bias_init, self.axes[self.contract :]), self.features
            )
        if weights_only:
            return kernel, bias
        y = jnp.tensordot(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            axes=(tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract))),
        )
        return y if bias is None else y + bias.astype(self.dtype)


def layer_norm(
    epsilon: float,
    dtype,
    *,
    axes: tuple[str | None, ...] = ("norm",),
    affine: bool = True,
    name: str | None = None,
) -> nn.LayerNorm:
    """LayerNorm over the trailing ``len(axes)`` dims, two-pass variance as PyTorch."""
    reduce = tuple(range(-len(axes), 0))
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        use_scale=affine,
        use_bias=affine,
        reduction_axes=reduce,
        feature_axes=reduce,
        scale_init=named(ones, axes),
        bias_init=named(zeros, axes),
        use_fast_variance=False,
        name=name,
    )


def gelu(x: jax.Array) -> jax.Array:
    return nn.gelu(x, approximate=False)  # the exact (erf) form, as torch.nn.GELU


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


def _differential_core(module: nn.Module, run: Execution, q1, k1, q2, k2, v, lam, mask):
    """Runs differential attention; sows the two maps when intermediates are mutable."""
    if module.is_mutable_collection("intermediates"):
        out, maps = attn_lib.differential_attention(
            q1, k1, q2, k2, v, lam, mask=mask, return_maps=True
        )
        module.sow("intermediates", "attention_maps", jnp.stack(maps, axis=1))
        return out
    return attn_lib.differential_attention(
        q1, k1, q2, k2, v, lam, mask=mask, implementation=run.attention_impl,
        platform=run.platform, stack_heads=run.attention_stack_heads,
        interpret=run.attention_interpret,
    )  # fmt: skip


HEAD_AXES = ("batch", "length", "heads", "head_dim")  # logical axes of per-head activations


class AsdaAttention(nn.Module):
    """Release form: qk → [q1 | q2 | k1 | k2], v; (A1 − λA2)v; LayerNorm over all heads × 0.95."""

    cfg: ModelConfig
    run: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:  # (B, T, D)
        c, dtype = self.cfg, self.run.compute_dtype
        dense = functools.partial(Linear, dtype=dtype)
        qk = dense(
            (4, c.num_heads, c.head_dim), ("embed", "qk_group", "heads", "head_dim"), name="qk"
        )(x)  # (B, T, 4, H, Dh)
        v = dense((c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), name="v")(x)
        qk = sharding.constrain(qk, ("batch", "length", "qk_group", "heads", "head_dim"))
        v = sharding.constrain(v, HEAD_AXES)
        if self.is_mutable_collection("intermediates"):
            q1, q2, k1, k2 = (qk[:, :, i] for i in range(4))
            o = _differential_core(self, self.run, q1, k1, q2, k2, v, c.diff_lambda, mask)
        else:
            o = attn_lib.fused_projection_attention(
                qk, v, c.diff_lambda, mask=mask, implementation=self.run.attention_impl,
                platform=self.run.platform, stack_heads=self.run.attention_stack_heads,
                interpret=self.run.attention_interpret,
            )  # fmt: skip
        o = layer_norm(1e-5, dtype, axes=("heads", "head_dim"), name="norm")(o)
        o = o * c.attn_out_scale
        return dense((c.embed_dim,), ("heads", "head_dim", "embed"), contract=2, name="proj")(o)


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
        dense = functools.partial(Linear, use_bias=False, dtype=dtype)
        pair_axes = ("embed", "heads", "qk_group", "head_dim")
        q = dense((heads, 2, d), pair_axes, name="q")(x)  # (B, T, H, 2, d)
        k = dense((heads, 2, d), pair_axes, name="k")(x)
        v = dense((heads, 2 * d), ("embed", "heads", "head_dim"), name="v")(x)  # (B, T, H, 2d)
        init = lambda_init(self.layer_index)
        lam_params = [
            self.param(n, named(nn.initializers.normal(0.1), ("head_dim",)), (d,))
            for n in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
        ]
        lq1, lk1, lq2, lk2 = lam_params
        lam = jnp.exp(jnp.sum(lq1 * lk1)) - jnp.exp(jnp.sum(lq2 * lk2)) + init
        o = _differential_core(
            self, self.run, q[:, :, :, 0], k[:, :, :, 0], q[:, :, :, 1], k[:, :, :, 1], v, lam, mask
        )
        o = nn.RMSNorm(
            epsilon=1e-5, dtype=dtype, scale_init=named(ones, ("head_dim",)), name="subln"
        )(o)
        o = o * (1.0 - init)
        return dense((c.embed_dim,), ("heads", "head_dim", "embed"), contract=2, name="out_proj")(o)


class PlainAttention(nn.Module):
    """Standard multi-head attention (EAT / data2vec 2.0 layout): the baseline."""

    cfg: ModelConfig
    run: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        c, run = self.cfg, self.run
        dense = functools.partial(Linear, dtype=run.compute_dtype)
        qkv = dense(
            (3, c.num_heads, c.head_dim), ("embed", "qk_group", "heads", "head_dim"), name="qkv"
        )(x)
        q, k, v = (sharding.constrain(qkv[:, :, i], HEAD_AXES) for i in range(3))
        if self.is_mutable_collection("intermediates"):
            o, a = attn_lib.dot_product_attention(q, k, v, mask=mask, return_maps=True)
            self.sow("intermediates", "attention_maps", a[:, None])
        else:
            o = attn_lib.dot_product_attention(
                q, k, v, mask=mask, implementation=run.attention_impl, platform=run.platform,
                interpret=run.attention_interpret,
            )  # fmt: skip
        return dense((c.embed_dim,), ("heads", "head_dim", "embed"), contract=2, name="proj")(o)


def make_attention(cfg: ModelConfig, run: Execution, layer_index: int) -> nn.Module:
    if cfg.attention == "asda":
        return AsdaAttention(cfg, run, name="attn")
    if cfg.attention == "diff":
        return DiffTransformerAttention(cfg, layer_index, run, name="attn")
    return PlainAttention(cfg, run, name="attn")


# ---------------------------------------------------------------------------- blocks


class Mlp(nn.Module):
    cfg: ModelConfig
    run: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, run, dtype = self.cfg, self.run, self.run.compute_dtype
        fc1 = Linear((c.mlp_dim,), ("embed", "mlp"), dtype=dtype, name="fc1")
        fc2 = Linear((c.embed_dim,), ("mlp", "embed"), dtype=dtype, name="fc2")
        if run.mlp == "pallas":  # (mlp_kernel: the hidden layer only in VMEM)
            w1, b1 = fc1(x, weights_only=True)
            w2, b2 = fc2(jnp.zeros((c.mlp_dim,), dtype), weights_only=True)
            return mlp_kernel.mlp(
                x.astype(dtype), w1, b1, w2, b2, interpret=run.attention_interpret
            )  # fmt: skip
        h = sharding.constrain(gelu(fc1(x)), ("batch", "length", "mlp"))
        return fc2(h)


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


# ---------------------------------------------------------------------------- heads


def grouped_conv(x: jax.Array, kernel: jax.Array, groups: int, impl: str = "xla") -> jax.Array:
    """k×k grouped convolution with SAME padding: (B, H, W, Cin) → (B, H, W, Cout).

    ``kernel`` has ``nn.Conv``'s layout (k, k, Cin/G, Cout). ``impl="xla"`` is XLA's
    grouped convolution (the reference; TPU partitions it well); ``"per_device"`` the
    same with each device convolving its own examples (``shard_map`` over the batch
    axes): left to itself the GPU compiler's SPMD partitioner all-gathered the whole
    batch before every decoder convolution (12 × 576 MiB per step at the gpu preset,
    every GPU convolving the global batch); ``"taps"`` computes the same sums as k²
    group-batched matmuls whose products are shifted into place, because XLA CPU's
    kernel gradient of a grouped convolution is slow (BENCHMARKS.md).
    """
    if impl not in GROUPED_CONV_FORMS:
        raise ValueError(f"grouped_conv impl must be one of {GROUPED_CONV_FORMS}, got {impl!r}")
    if impl == "taps":
        return _grouped_conv_by_taps(x, kernel, groups)
    conv = functools.partial(
        jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
    )  # fmt: skip
    by_example = sharding.current_mesh_spec(("batch", None, None, None))
    if impl == "xla" or by_example is None:
        return conv(x, kernel)
    per_device = jax.shard_map(
        conv, in_specs=(by_example, jax.sharding.PartitionSpec()), out_specs=by_example
    )
    return per_device(x, kernel)


def _grouped_conv_by_taps(x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
    """Σ over taps (dy, dx) of the input times tap (dy, dx), shifted into place.

    Each tap is one matmul batched over a leading group axis on the *unshifted* input,
    so no operand is a strided view; the k² shifted products are summed in one
    elementwise pass (shifting the inputs instead costs a transposing copy per tap).
    """
    batch, height, width, channels = x.shape
    k = kernel.shape[0]
    pad = k // 2
    per_in, per_out = channels // groups, kernel.shape[-1] // groups
    grouped = x.reshape(batch, height, width, groups, per_in).transpose(3, 0, 1, 2, 4)
    taps = kernel.reshape(k, k, per_in, groups, per_out).transpose(0, 1, 3, 2, 4)  # (k,k,G,i,o)
    out = 0.0
    for dy in range(k):
        for dx in range(k):
            product = jnp.einsum("gbhwi,gio->gbhwo", grouped, taps[dy, dx])
            product = jnp.pad(product, ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)))
            out = out + product[:, :, dy : dy + height, dx : dx + width]
    return out.transpose(1, 2, 3, 0, 4).reshape(batch, height, width, groups * per_out)


class DecoderBlock(nn.Module):
    """Grouped conv k×k → LayerNorm over channels (no affine, eps 1e-5) → GELU, with a
    residual around it when the widths match.

    Its parameters are the conv's ``kernel`` (k, k, Cin/G, Cout) and ``bias``, as the
    release's ``decoder.blocks.N.0``. ``x`` is (B, H, W, Cin), except for the "pallas"
    form, whose kernel (``decoder_kernel``) runs the whole block channels-major:
    (B, Cin, H, W) -> (B, Cout, H, W).
    """

    cfg: ModelConfig
    run: Execution = Execution()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, run = self.cfg, self.run
        channels_major = run.decoder_conv == "pallas"
        k, channels = c.decoder_kernel, x.shape[1 if channels_major else -1]
        init = torch_default_init(channels // c.decoder_groups * k * k)
        kernel = self.param(
            "kernel",
            named(init, ("conv_time", "conv_freq", "conv_in", "embed")),
            (k, k, channels // c.decoder_groups, c.decoder_dim),
        )
        bias = self.param("bias", named(init, ("embed",)), (c.decoder_dim,))
        x, kernel = x.astype(run.compute_dtype), kernel.astype(run.compute_dtype)
        if channels_major:
            batch, _, height, width = x.shape
            flat = x.reshape(batch, channels, height * width)
            y = decoder_kernel.conv_block(
                flat, kernel, bias, (height, width), groups=c.decoder_groups,
                interpret=run.attention_interpret,
            )  # fmt: skip
            return y.reshape(batch, c.decoder_dim, height, width)
        y = grouped_conv(x, kernel, c.decoder_groups, run.decoder_conv) + bias.astype(x.dtype)
        y = gelu(layer_norm(1e-5, run.compute_dtype, affine=False)(y))
        return y + x if y.shape == x.shape else y


class Decoder(nn.Module):
    """The student's CNN decoder over the (time, freq) patch grid (release: Decoder2d):
    ``decoder_layers`` blocks, then a Linear back to the encoder width. Blocks are
    rematerialised like the encoder's (the decoder holds most of a pretraining step's
    activations); the "pallas" form's kernel recomputes its own instead, and the
    blocks pass their activations channels-major between them.
    """

    cfg: ModelConfig
    run: Execution = Execution()

    @nn.compact
    def __call__(self, grid: jax.Array) -> jax.Array:  # (B, Nt, Nf, D) -> (B, Nt·Nf, D)
        c, run = self.cfg, self.run
        channels_major = run.decoder_conv == "pallas"
        block = DecoderBlock
        if run.remat_policy != "none" and not channels_major:
            block = nn.remat(DecoderBlock, policy=REMAT_POLICIES[run.remat_policy])
        x = grid.astype(run.compute_dtype)
        if channels_major:
            x = x.transpose(0, 3, 1, 2)  # (B, D, Nt, Nf)
        for i in range(c.decoder_layers):
            x = block(c, run, name=f"blocks_{i}")(x)
        if channels_major:
            x = x.transpose(0, 2, 3, 1)
        batch, time_patches, freq_patches, dim = x.shape
        x = x.reshape(batch, time_patches * freq_patches, dim)
        init = torch_default_init(c.decoder_dim)
        return Linear(
            (c.embed_dim,),
            ("embed", "act_embed"),
            kernel_init=init,
            bias_init=init,
            dtype=run.compute_dtype,
            name="proj",
        )(x)


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
        logits = Linear(
            (self.num_classes,),
            ("embed", "classes"),
            kernel_init=nn.initializers.truncated_normal(0.02),
            dtype=dtype,
            name="head",
        )(pooled)
        return logits.astype(jnp.float32)


def abstract_params(module: nn.Module, *input_shapes: tuple[int, ...]) -> dict:
    """``module``'s parameters for float32 inputs of ``input_shapes``, as unplaced
    ShapeDtypeStructs (nothing is allocated)."""
    inputs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in input_shapes]
    return nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))["params"]
