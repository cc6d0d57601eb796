"""The small pieces the encoder and decoder are built from: initialisers, parameters
with logical axis names, the products and norms that use them.

A module owns its parameters (``Dense``) and hands them to a pure function of arrays
(``linear``, or a kernel), so the same parameters feed the XLA form and a kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


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


class Dense(nn.Module):
    """The parameters of a product contracting ``inputs`` into ``features``: the kernel
    in its structured shape (inputs…, features…), e.g. (D, 4, H, Dh) for the fused q/k
    projection, so each axis carries its own logical name, and the bias (features…)."""

    inputs: tuple[int, ...]
    features: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical names of kernel dims (inputs…, features…)
    use_bias: bool = True
    kernel_init: Callable = bert_init
    bias_init: Callable = zeros

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:  # kernel, bias (None: none)
        kernel = self.param(
            "kernel", named(self.kernel_init, self.axes), (*self.inputs, *self.features)
        )
        if not self.use_bias:
            return kernel, None
        bias_axes = self.axes[len(self.inputs) :]
        return kernel, self.param("bias", named(self.bias_init, bias_axes), self.features)


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype, contract: int = 1):
    """x · W + b in ``dtype``, contracting x's last ``contract`` dims with W's first."""
    y = jnp.tensordot(
        x.astype(dtype),
        kernel.astype(dtype),
        axes=(tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract))),
    )
    return y if bias is None else y + bias.astype(dtype)


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


def abstract_params(module: nn.Module, *input_shapes: tuple[int, ...]) -> Any:
    """``module``'s parameters for float32 inputs of ``input_shapes``, as unplaced
    ShapeDtypeStructs (nothing is allocated)."""
    inputs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in input_shapes]
    return nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))["params"]
