"""The student's CNN decoder over the (time, freq) patch grid (the release's Decoder2d).

``decoder_layers`` blocks, each a grouped k×k convolution → LayerNorm over the
channels (no affine, eps 1e-5) → GELU, with a residual around it where the widths
match, then a Linear back to the encoder width. The run's form decides the layout of
the whole decoder once: channels-last (B, H, W, C) for the XLA forms of the
convolution, channels-major (B, C, H, W) for the Pallas kernel (``kernels.decoder``),
which computes a whole block.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from asda_jax import hardware, sharding
from asda_jax.kernels import decoder as decoder_kernel
from asda_jax.model.config import (
    GROUPED_CONV_FORMS,
    KERNEL_FORM,
    REMAT_POLICIES,
    Execution,
    ModelConfig,
)
from asda_jax.model.layers import Dense, gelu, layer_norm, linear, named, torch_default_init

BY_EXAMPLE = sharding.split("batch", None, None, None)  # (B, H, W, C) split by example


def grouped_conv(x: jax.Array, kernel: jax.Array, groups: int, impl: str = "xla") -> jax.Array:
    """k×k grouped convolution with SAME padding: (B, H, W, Cin) → (B, H, W, Cout).

    ``kernel`` has ``nn.Conv``'s layout (k, k, Cin/G, Cout). ``impl="xla"`` is XLA's
    grouped convolution (the reference); ``"per_device"`` the same with each device
    convolving its own examples (left to itself the GPU compiler's partitioner gathers
    the whole batch onto every device before each convolution); ``"taps"`` computes the
    same sums as k² group-batched matmuls whose products are shifted into place, because
    XLA CPU's kernel gradient of a grouped convolution is slow.
    """
    if impl not in GROUPED_CONV_FORMS:
        raise ValueError(f"grouped_conv impl must be one of {GROUPED_CONV_FORMS}, got {impl!r}")
    if impl == "taps":
        return _grouped_conv_by_taps(x, kernel, groups)
    conv = functools.partial(
        jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
    )  # fmt: skip
    if impl == "per_device":
        conv = sharding.per_device(conv, (BY_EXAMPLE, sharding.WHOLE), BY_EXAMPLE)
    return conv(x, kernel)


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


def channels_last_block(x, kernel, bias, *, groups: int, form: str, dtype) -> jax.Array:
    """One block on (B, H, W, Cin) → (B, H, W, Cout) with the convolution in ``form``."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = grouped_conv(x, kernel, groups, form) + bias.astype(x.dtype)
    y = gelu(layer_norm(1e-5, dtype, affine=False).apply({}, y))
    return y + x if y.shape == x.shape else y


def channels_major_block(
    x, kernel, bias, *, groups: int, chip: hardware.Chip, interpret: bool, dtype
) -> jax.Array:
    """One block on (B, Cin, H, W) → (B, Cout, H, W), the whole block one Pallas kernel
    in the VMEM ``chip`` lends a kernel (its backward split over the device's cores)."""
    batch, channels, height, width = x.shape
    flat = x.astype(dtype).reshape(batch, channels, height * width)
    y = decoder_kernel.conv_block(
        flat, kernel.astype(dtype), bias, (height, width), groups=groups,
        vmem_bytes=chip.kernel_vmem_bytes, cores=chip.cores_per_device, interpret=interpret,
    )  # fmt: skip
    return y.reshape(batch, kernel.shape[-1], height, width)


class DecoderBlock(nn.Module):
    """One block's parameters: the convolution's ``kernel`` (k, k, Cin/G, Cout) and
    ``bias``, as the release's ``decoder.blocks.N.0``."""

    cfg: ModelConfig
    in_channels: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        c, k = self.cfg, self.cfg.decoder_kernel
        init = torch_default_init(self.in_channels // c.decoder_groups * k * k)
        kernel = self.param(
            "kernel",
            named(init, ("conv_time", "conv_freq", "conv_in", "embed")),
            (k, k, self.in_channels // c.decoder_groups, c.decoder_dim),
        )
        return kernel, self.param("bias", named(init, ("embed",)), (c.decoder_dim,))


class Decoder(nn.Module):
    """The blocks over the patch grid, then a Linear back to the encoder width. Blocks
    are rematerialised like the encoder's (the decoder holds most of a pretraining
    step's activations); the kernel form recomputes its own instead."""

    cfg: ModelConfig
    run: Execution = Execution()

    @nn.compact
    def __call__(self, grid: jax.Array) -> jax.Array:  # (B, Nt, Nf, D) -> (B, Nt·Nf, D)
        c, run, dtype = self.cfg, self.run, self.run.compute_dtype
        kernel_form = run.decoder_conv == KERNEL_FORM
        if kernel_form:
            block = functools.partial(
                channels_major_block, groups=c.decoder_groups, interpret=run.interpret_kernels,
                chip=run.hardware, dtype=dtype,
            )  # fmt: skip
            x = grid.astype(dtype).transpose(0, 3, 1, 2)  # (B, D, Nt, Nf)
        else:
            block = functools.partial(
                channels_last_block, groups=c.decoder_groups, form=run.decoder_conv, dtype=dtype
            )
            if run.remat_policy != "none":
                block = jax.checkpoint(block, policy=REMAT_POLICIES[run.remat_policy])
            x = grid.astype(dtype)
        channels = c.embed_dim
        for i in range(c.decoder_layers):
            x = block(x, *DecoderBlock(c, channels, name=f"blocks_{i}")())
            channels = c.decoder_dim
        if kernel_form:
            x = x.transpose(0, 2, 3, 1)
        batch, time_patches, freq_patches, dim = x.shape
        x = x.reshape(batch, time_patches * freq_patches, dim)
        init = torch_default_init(c.decoder_dim)
        proj = Dense(
            (c.decoder_dim,), (c.embed_dim,), ("embed", "act_embed"), kernel_init=init,
            bias_init=init, name="proj",
        )  # fmt: skip
        return linear(x, *proj(), dtype)
