"""The authors' PyTorch release ↔ our parameters: names and layouts (NumPy only).

A release state_dict (fairseq, names as in ``docs/method.md``) maps onto our
Flax parameter tree:

======================================================  =================================
release name                                            ours
======================================================  =================================
modality_encoders.IMAGE.local_encoder.proj.weight       patch_embed/proj/kernel  OIHW→HWIO
modality_encoders.IMAGE.extra_tokens                    cls_token
modality_encoders.IMAGE.context_encoder.norm.*          context_norm/{scale,bias}
blocks.N.attn.qk.weight (4D, D)                         blocks_N/attn/qk/kernel (D, 4, H, Dh)
blocks.N.attn.v / proj / norm                           blocks_N/attn/{v,proj,norm}
blocks.N.{norm1,norm2,mlp.fc1,mlp.fc2}                  blocks_N/{norm1,norm2,mlp/fc1,mlp/fc2}
modality_encoders.IMAGE.decoder.blocks.N.0.*            decoder/blocks_N/{kernel,bias}
modality_encoders.IMAGE.decoder.proj.*                  decoder/proj/*
fc_norm.*, head.*                                       fc_norm/*, head/*
======================================================  =================================

The fixed positional table (``fixed_positional_encoder.positions``) is recomputed,
not loaded; ``positions_max_difference`` says how far a checkpoint's copy is from ours.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from asda_jax.model import ModelConfig, sincos_table

IMAGE = "modality_encoders.IMAGE."
POSITIONS = IMAGE + "fixed_positional_encoder.positions"


def _linear(state, name, in_shape, out_shape, bias=True) -> dict:
    """torch Linear (out, in) → our kernel (*in_shape, *out_shape)."""
    kernel = state[name + ".weight"].T.reshape(*in_shape, *out_shape)
    params = {"kernel": kernel}
    if bias:
        params["bias"] = state[name + ".bias"].reshape(out_shape)
    return params


def _norm(state, name, shape=None) -> dict:
    scale, bias = state[name + ".weight"], state[name + ".bias"]
    if shape is not None:
        scale, bias = scale.reshape(shape), bias.reshape(shape)
    return {"scale": scale, "bias": bias}


def _conv(state, name) -> dict:
    """torch Conv2d (O, I/g, kh, kw) → Flax (kh, kw, I/g, O)."""
    return {"kernel": state[name + ".weight"].transpose(2, 3, 1, 0), "bias": state[name + ".bias"]}


def _block(state, prefix: str, cfg: ModelConfig) -> dict:
    d, h, dh, m = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    p = prefix + "attn."
    return {
        "attn": {
            "qk": _linear(state, p + "qk", (d,), (4, h, dh)),
            "v": _linear(state, p + "v", (d,), (h, dh)),
            "norm": _norm(state, p + "norm", (h, dh)),
            "proj": _linear(state, p + "proj", (h, dh), (d,)),
        },
        "norm1": _norm(state, prefix + "norm1"),
        "mlp": {
            "fc1": _linear(state, prefix + "mlp.fc1", (d,), (m,)),
            "fc2": _linear(state, prefix + "mlp.fc2", (m,), (d,)),
        },
        "norm2": _norm(state, prefix + "norm2"),
    }


def encoder_params(state: Mapping[str, np.ndarray], cfg: ModelConfig, prefix: str = "") -> dict:
    """Our ``Encoder`` parameters from a release state_dict (release form only)."""
    if cfg.attention != "asda":
        raise ValueError(
            f"release checkpoints hold the 'asda' attention form, not {cfg.attention!r}"
        )
    s = {
        k[len(prefix) :]: np.asarray(v, np.float32)
        for k, v in state.items()
        if k.startswith(prefix)
    }
    return {
        "patch_embed": {"proj": _conv(s, IMAGE + "local_encoder.proj")},
        "cls_token": s[IMAGE + "extra_tokens"],
        "context_norm": _norm(s, IMAGE + "context_encoder.norm"),
        **{f"blocks_{i}": _block(s, f"blocks.{i}.", cfg) for i in range(cfg.depth)},
    }


def decoder_params(state: Mapping[str, np.ndarray], cfg: ModelConfig, prefix: str = "") -> dict:
    """Our ``Decoder`` parameters from a release pretraining state_dict."""
    s = {
        k[len(prefix) :]: np.asarray(v, np.float32)
        for k, v in state.items()
        if k.startswith(prefix)
    }
    dec = IMAGE + "decoder."
    params = {f"blocks_{i}": _conv(s, f"{dec}blocks.{i}.0") for i in range(cfg.decoder_layers)}
    params["proj"] = _linear(s, dec + "proj", (cfg.decoder_dim,), (cfg.embed_dim,))
    return params


def head_params(state: Mapping[str, np.ndarray], prefix: str = "") -> dict:
    """``fc_norm`` and ``head`` of a fine-tuned release checkpoint."""
    s = {
        k[len(prefix) :]: np.asarray(v, np.float32)
        for k, v in state.items()
        if k.startswith(prefix)
    }
    num_classes, width = s["head.weight"].shape
    return {
        "fc_norm": _norm(s, "fc_norm"),
        "head": _linear(s, "head", (width,), (num_classes,)),
    }


def positions_max_difference(
    state: Mapping[str, np.ndarray], cfg: ModelConfig, prefix: str = ""
) -> float:
    """Largest |difference| between a checkpoint's positional table and ours."""
    theirs = np.asarray(state[prefix + POSITIONS], np.float32)[0]
    ours = sincos_table(theirs.shape[0] // cfg.freq_patches, cfg.freq_patches, cfg.embed_dim)
    return float(np.abs(theirs - ours).max())


def release_shapes(cfg: ModelConfig, decoder: bool) -> dict[str, tuple[int, ...]]:
    """Every state_dict name of a release encoder of ``cfg`` (and its decoder), with the
    tensor's shape."""
    d, m, p = cfg.embed_dim, cfg.mlp_dim, cfg.patch_size
    shapes = {
        IMAGE + "local_encoder.proj.weight": (d, 1, p, p),
        IMAGE + "local_encoder.proj.bias": (d,),
        IMAGE + "extra_tokens": (1, 1, d),
        POSITIONS: (1, cfg.max_time_patches * cfg.freq_patches, d),
        IMAGE + "context_encoder.norm.weight": (d,),
        IMAGE + "context_encoder.norm.bias": (d,),
    }
    linears = {"attn.qk": (4 * d, d), "attn.v": (d, d), "attn.proj": (d, d)}
    linears |= {"mlp.fc1": (m, d), "mlp.fc2": (d, m)}
    for i in range(cfg.depth):
        for name, (out, inp) in linears.items():
            shapes |= {f"blocks.{i}.{name}.weight": (out, inp), f"blocks.{i}.{name}.bias": (out,)}
        for norm in ("norm1", "attn.norm", "norm2"):
            shapes |= {f"blocks.{i}.{norm}.weight": (d,), f"blocks.{i}.{norm}.bias": (d,)}
    if decoder:
        dec, dd, k = IMAGE + "decoder.", cfg.decoder_dim, cfg.decoder_kernel
        for i in range(cfg.decoder_layers):
            width = (d if i == 0 else dd) // cfg.decoder_groups
            shapes |= {
                f"{dec}blocks.{i}.0.weight": (dd, width, k, k),
                f"{dec}blocks.{i}.0.bias": (dd,),
            }
        shapes |= {dec + "proj.weight": (d, dd), dec + "proj.bias": (d,)}
    return shapes
