"""PyTorch state_dicts ↔ our parameter trees: one table of names and layouts (NumPy only).

Two PyTorch layouts hold the same encoder under different names (``Naming``): the
authors' fairseq release (names as in ``docs/method.md``) and the Hugging Face
uploads of EAT and SSLAM (the fairseq names renamed one to one, ``docs/weights.md``).
Each tensor is one ``Tensor`` row: its state_dict name, its path in our tree and how
its layout turns into ours and back, so import and export read the same table.

====================================  ==============================  ===================
fairseq (release), IMAGE = modality_  Hugging Face (EAT, SSLAM)       ours
encoders.IMAGE.
====================================  ==============================  ===================
IMAGE.local_encoder.proj.*            model.local_encoder.proj.*      patch_embed/proj
IMAGE.extra_tokens                    model.extra_tokens              cls_token
IMAGE.context_encoder.norm.*          model.pre_norm.*                context_norm
blocks.N.attn.{qk,v,norm,proj} (ASDA) —                               blocks_N/attn/...
blocks.N.attn.{qkv,proj} (EAT)        model.blocks.N.attn.{qkv,proj}  blocks_N/attn/...
blocks.N.{norm1,norm2,mlp.fc1,fc2}    model.blocks.N.{...}            blocks_N/{...}
IMAGE.decoder.*                       —                               decoder/...
fc_norm.*, head.*                     model.fc_norm.*, model.head.*   fc_norm, head
====================================  ==============================  ===================

Linear weights are (out, in) there and (*in, *out) here, convolutions OIHW there and
HWIO here.

The fixed positional table (``fixed_positional_encoder.positions``) is computed, not a
parameter of ours: an import checks a file's copy against ours
(``positions_max_difference``), an export writes ours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from asda_jax.model import ModelConfig, sincos_table

IMAGE = "modality_encoders.IMAGE."
POSITIONS = IMAGE + "fixed_positional_encoder.positions"


@dataclasses.dataclass(frozen=True)
class Naming:
    """Where one PyTorch layout keeps the encoder's pieces (state_dict name prefixes)."""

    patch: str
    cls: str
    positions: str
    context_norm: str
    blocks: str
    decoder: str | None  # None: the layout holds no pretraining decoder
    fc_norm: str
    head: str


FAIRSEQ = Naming(
    patch=IMAGE + "local_encoder.proj",
    cls=IMAGE + "extra_tokens",
    positions=POSITIONS,
    context_norm=IMAGE + "context_encoder.norm",
    blocks="blocks.",
    decoder=IMAGE + "decoder.",
    fc_norm="fc_norm",
    head="head",
)
HUGGING_FACE = Naming(
    patch="model.local_encoder.proj",
    cls="model.extra_tokens",
    positions="model.fixed_positional_encoder.positions",
    context_norm="model.pre_norm",
    blocks="model.blocks.",
    decoder=None,
    fc_norm="model.fc_norm",
    head="model.head",
)


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One state_dict tensor and the parameter of ours it is."""

    theirs: str  # state_dict name
    ours: tuple[str, ...]  # path in our parameter tree
    torch_shape: tuple[int, ...]
    our_shape: tuple[int, ...]
    form: str  # "linear": (out, in) ↔ (*in, *out); "conv": OIHW ↔ HWIO; "reshape"

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        if self.form == "linear":
            return x.T.reshape(self.our_shape)
        if self.form == "conv":
            return x.transpose(2, 3, 1, 0)
        return x.reshape(self.our_shape)

    def to_theirs(self, x: np.ndarray) -> np.ndarray:
        if self.form == "linear":
            return x.reshape(self.torch_shape[1], self.torch_shape[0]).T
        if self.form == "conv":
            return x.transpose(3, 2, 0, 1)
        return x.reshape(self.torch_shape)


def _linear(theirs: str, ours: tuple, in_shape: tuple, out_shape: tuple) -> list[Tensor]:
    size_in, size_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    return [
        Tensor(
            f"{theirs}.weight",
            (*ours, "kernel"),
            (size_out, size_in),
            (*in_shape, *out_shape),
            "linear",
        ),
        Tensor(f"{theirs}.bias", (*ours, "bias"), (size_out,), out_shape, "reshape"),
    ]


def _norm(theirs: str, ours: tuple, shape: tuple) -> list[Tensor]:
    size = (int(np.prod(shape)),)
    return [
        Tensor(f"{theirs}.weight", (*ours, "scale"), size, shape, "reshape"),
        Tensor(f"{theirs}.bias", (*ours, "bias"), size, shape, "reshape"),
    ]


def _conv(theirs: str, ours: tuple, out: int, width: int, kernel: int) -> list[Tensor]:
    return [
        Tensor(
            f"{theirs}.weight",
            (*ours, "kernel"),
            (out, width, kernel, kernel),
            (kernel, kernel, width, out),
            "conv",
        ),
        Tensor(f"{theirs}.bias", (*ours, "bias"), (out,), (out,), "reshape"),
    ]


def _attention(theirs: str, ours: tuple, cfg: ModelConfig) -> list[Tensor]:
    d, heads = cfg.embed_dim, (cfg.num_heads, cfg.head_dim)
    proj = _linear(theirs + "proj", (*ours, "proj"), heads, (d,))
    if cfg.attention == "asda":
        return [
            *_linear(theirs + "qk", (*ours, "qk"), (d,), (4, *heads)),
            *_linear(theirs + "v", (*ours, "v"), (d,), heads),
            *_norm(theirs + "norm", (*ours, "norm"), heads),
            *proj,
        ]
    if cfg.attention == "plain":
        return [*_linear(theirs + "qkv", (*ours, "qkv"), (d,), (3, *heads)), *proj]
    raise ValueError(f"no PyTorch layout holds the {cfg.attention!r} attention form")


def encoder_tensors(cfg: ModelConfig, naming: Naming = FAIRSEQ) -> list[Tensor]:
    """Every tensor of an encoder of ``cfg`` (our paths from the encoder's root)."""
    d, m, p = cfg.embed_dim, cfg.mlp_dim, cfg.patch_size
    rows = [
        *_conv(naming.patch, ("patch_embed", "proj"), d, 1, p),
        Tensor(naming.cls, ("cls_token",), (1, 1, d), (1, 1, d), "reshape"),
        *_norm(naming.context_norm, ("context_norm",), (d,)),
    ]
    for i in range(cfg.depth):
        theirs, ours = f"{naming.blocks}{i}.", (f"blocks_{i}",)
        rows += [
            *_attention(theirs + "attn.", (*ours, "attn"), cfg),
            *_norm(theirs + "norm1", (*ours, "norm1"), (d,)),
            *_linear(theirs + "mlp.fc1", (*ours, "mlp", "fc1"), (d,), (m,)),
            *_linear(theirs + "mlp.fc2", (*ours, "mlp", "fc2"), (m,), (d,)),
            *_norm(theirs + "norm2", (*ours, "norm2"), (d,)),
        ]
    return rows


def decoder_tensors(cfg: ModelConfig, naming: Naming = FAIRSEQ) -> list[Tensor]:
    """Every tensor of the pretraining decoder (our paths from the decoder's root)."""
    if naming.decoder is None:
        raise ValueError("this layout holds no pretraining decoder")
    dd, k = cfg.decoder_dim, cfg.decoder_kernel
    rows = []
    for i in range(cfg.decoder_layers):
        width = (cfg.embed_dim if i == 0 else dd) // cfg.decoder_groups
        rows += _conv(f"{naming.decoder}blocks.{i}.0", (f"blocks_{i}",), dd, width, k)
    return rows + _linear(naming.decoder + "proj", ("proj",), (dd,), (cfg.embed_dim,))


def head_tensors(cfg: ModelConfig, num_classes: int, naming: Naming = FAIRSEQ) -> list[Tensor]:
    """``fc_norm`` and ``head`` of a classifier (our paths from the model's root)."""
    d = cfg.embed_dim
    return [
        *_norm(naming.fc_norm, ("fc_norm",), (d,)),
        *_linear(naming.head, ("head",), (d,), (num_classes,)),
    ]


def to_tree(state: Mapping[str, np.ndarray], tensors: list[Tensor]) -> dict:
    """Our (nested) parameter tree of ``tensors`` from a state_dict, as float32."""
    tree: dict = {}
    for t in tensors:
        node = tree
        for key in t.ours[:-1]:
            node = node.setdefault(key, {})
        node[t.ours[-1]] = t.to_ours(np.asarray(state[t.theirs], np.float32))
    return tree


def to_state(tree: Mapping, tensors: list[Tensor]) -> dict[str, np.ndarray]:
    """The state_dict of ``tensors`` from our parameter tree, as contiguous float32."""
    state = {}
    for t in tensors:
        node = tree
        for key in t.ours:
            node = node[key]
        state[t.theirs] = np.ascontiguousarray(t.to_theirs(np.asarray(node, np.float32)))
    return state


def shapes_of(tensors: list[Tensor]) -> dict[str, tuple[int, ...]]:
    return {t.theirs: t.torch_shape for t in tensors}


def compare_shapes(
    have: Mapping[str, tuple[int, ...]], want: Mapping[str, tuple[int, ...]]
) -> dict[str, list[str]]:
    """Names a file (``have``: name → shape) lacks, names it has beyond ``want``, and
    shapes that differ from what the model needs."""
    return {
        "missing": sorted(set(want) - set(have)),
        "unexpected": sorted(set(have) - set(want)),
        "shape_mismatches": sorted(
            f"{k}: file {tuple(have[k])}, model {want[k]}"
            for k in want
            if k in have and tuple(have[k]) != want[k]
        ),
    }


AUDIOSET_CLASSES = 527


def classifier_description(num_classes: int) -> dict:
    """How the authors' classifiers (the release's, EAT's, SSLAM's) score, as an export
    records it: the CLS token's logits through a sigmoid, AudioSet's labels at 527."""
    described = dict(pooling="cls", scores="sigmoid")
    if num_classes == AUDIOSET_CLASSES:
        described["labels"] = "audioset"
    return described


def positions_table(cfg: ModelConfig) -> np.ndarray:  # (1, max_time_patches·F, D)
    """The fixed positional table as the PyTorch layouts store it."""
    return sincos_table(cfg.max_time_patches, cfg.freq_patches, cfg.embed_dim)[None]


def _unprefixed(state: Mapping[str, np.ndarray], prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def encoder_params(state: Mapping[str, np.ndarray], cfg: ModelConfig, prefix: str = "") -> dict:
    """Our ``Encoder`` parameters from a release state_dict."""
    return to_tree(_unprefixed(state, prefix), encoder_tensors(cfg))


def decoder_params(state: Mapping[str, np.ndarray], cfg: ModelConfig, prefix: str = "") -> dict:
    """Our ``Decoder`` parameters from a release pretraining state_dict."""
    return to_tree(_unprefixed(state, prefix), decoder_tensors(cfg))


def head_params(state: Mapping[str, np.ndarray], prefix: str = "") -> dict:
    """``fc_norm`` and ``head`` of a fine-tuned release checkpoint."""
    s = _unprefixed(state, prefix)
    num_classes, width = np.shape(s["head.weight"])
    return to_tree(s, head_tensors(ModelConfig(embed_dim=width), num_classes))


def positions_max_difference(
    state: Mapping[str, np.ndarray], cfg: ModelConfig, name: str = POSITIONS
) -> float:
    """Largest |difference| between a checkpoint's positional table and ours."""
    theirs = np.asarray(state[name], np.float32)[0]
    ours = sincos_table(theirs.shape[0] // cfg.freq_patches, cfg.freq_patches, cfg.embed_dim)
    return float(np.abs(theirs - ours).max())


def release_shapes(cfg: ModelConfig, decoder: bool) -> dict[str, tuple[int, ...]]:
    """Every state_dict name of a release encoder of ``cfg`` (and its decoder), with the
    tensor's shape."""
    shapes = shapes_of(encoder_tensors(cfg))
    shapes[POSITIONS] = positions_table(cfg).shape
    if decoder:
        shapes |= shapes_of(decoder_tensors(cfg))
    return shapes
