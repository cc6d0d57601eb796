"""What a model is (``ModelConfig``, the architecture a checkpoint holds) and how it
computes on the devices in use (``Execution``, never saved with it); named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from asda_jax import attention, hardware

ATTENTION_VARIANTS = ("asda", "diff", "plain")
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
GROUPED_CONV_FORMS = ("xla", "per_device", "taps")  # decoder.grouped_conv
DECODER_CONV_FORMS = (*GROUPED_CONV_FORMS, "pallas")  # pallas: the whole block, kernels.decoder
MLP_FORMS = ("xla", "pallas")  # pallas: fc1, GELU and fc2 in one kernel, kernels.mlp
KERNEL_FORM = "pallas"


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
    """How a model computes on devices of ``chip`` (a ``hardware.CHIPS`` name: the chip
    of the devices in use, never a setting); "auto" takes the chip's form
    (``hardware.Chip.forms``). The default is the CPU.

    A form asked for by name runs or the config is refused: a Pallas kernel runs on a
    TPU, or anywhere with ``interpret_kernels`` (which switches every kernel to
    interpret mode: the tests' way of running them on CPU). On several devices wait for
    an interpreted step to finish before dispatching other JAX work: JAX's TPU
    interpreter runs JAX operations inside its callbacks, and those deadlock against
    operations dispatched meanwhile to the devices the step holds."""

    chip: str = "cpu"
    dtype: str = "auto"  # compute dtype; parameters stay float32
    remat_policy: str = "none"
    attention_impl: str = "auto"  # per call, by the chip's rule and the length
    interpret_kernels: bool = False
    decoder_conv_impl: str = "auto"  # "auto" or one of DECODER_CONV_FORMS
    mlp_impl: str = "auto"  # "auto" or one of MLP_FORMS

    @property
    def hardware(self) -> hardware.Chip:
        return hardware.chip(self.chip)

    @property
    def compute_dtype(self):
        return DTYPES[self.hardware.forms.compute_dtype if self.dtype == "auto" else self.dtype]

    @property
    def mlp(self) -> str:
        return self.hardware.forms.mlp if self.mlp_impl == "auto" else self.mlp_impl

    @property
    def decoder_conv(self) -> str:
        if self.decoder_conv_impl == "auto":
            return self.hardware.forms.decoder_conv
        return self.decoder_conv_impl

    def validate(self) -> Execution:
        """Raises ValueError naming the first field unknown or not runnable on this chip."""
        for ok, message in (*self._names_known(), *self._runnable_here()):
            if not ok:
                raise ValueError(f"invalid execution: {message} ({self})")
        return self

    def _names_known(self) -> list[tuple[bool, str]]:
        def known(value, choices, what):
            return value == "auto" or value in choices, f"{what} must be 'auto' or in {choices}"

        return [
            known(self.dtype, list(DTYPES), "dtype"),
            (
                self.remat_policy in REMAT_POLICIES,
                f"remat_policy must be in {list(REMAT_POLICIES)}",
            ),
            known(self.attention_impl, attention.BACKENDS, "attention_impl"),
            known(self.decoder_conv_impl, DECODER_CONV_FORMS, "decoder_conv_impl"),
            known(self.mlp_impl, MLP_FORMS, "mlp_impl"),
        ]

    def _runnable_here(self) -> list[tuple[bool, str]]:
        chip = self.hardware
        kernels_run = chip.platform == "tpu" or self.interpret_kernels
        interpreted = "(interpret_kernels=True runs it interpreted: tests)"

        def tpu_kernel(asked: bool, what: str):
            return not asked or kernels_run, (
                f"{what} is a TPU kernel; this is {chip.description} {interpreted}"
            )

        return [
            tpu_kernel(self.attention_impl.startswith("pallas"), repr(self.attention_impl)),
            tpu_kernel(self.mlp == KERNEL_FORM, "mlp_impl 'pallas'"),
            tpu_kernel(self.decoder_conv == KERNEL_FORM, "decoder_conv_impl 'pallas'"),
            (
                self.attention_impl != "cudnn" or chip.platform == "gpu",
                f"attention_impl 'cudnn' needs a GPU; this is {chip.description}",
            ),
        ]


PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "small": dict(embed_dim=384, num_heads=6, decoder_dim=384),
    "demo": dict(
        embed_dim=192, depth=4, num_heads=4, decoder_dim=192, decoder_layers=3, decoder_groups=8
    ),
    "tiny": dict(
        embed_dim=64, depth=2, num_heads=4, decoder_dim=64, decoder_layers=2, decoder_groups=4
    ),
    # EAT's and SSLAM's encoders (docs/weights.md): plain attention, MLP ratio 4.
    "eat_base": dict(attention="plain", mlp_ratio=4.0),
    "eat_large": dict(
        attention="plain", mlp_ratio=4.0, embed_dim=1024, depth=24, num_heads=16, decoder_dim=1024
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named ModelConfig (``base``, ``small``, ``demo``, ``tiny``, ``eat_base``,
    ``eat_large``) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides}).validate()
