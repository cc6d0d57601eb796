"""Hugging Face model directories of the EAT layout (EAT, SSLAM) ↔ our parameters.

A directory holds ``config.json`` (the fields of EAT's ``EATConfig``) and
``model.safetensors`` (the fairseq names renamed one to one: ``release_weights.HUGGING_FACE``).
Reading runs no code of theirs: the JSON is parsed, the safetensors header is checked
here before any tensor is read, then the tensors come through safetensors' NumPy API.
Every config field our model cannot represent, and every tensor the layout does not
name or names with another shape, is refused by name (``docs/weights.md``).

Writing is the same table the other way: the plain-attention models of ours (EAT's
architecture) as ``config.json`` + ``model.safetensors``. The release form (ASDA's
differential attention) has no Hugging Face layout; it goes to the fairseq ``.pt``
(``torch_import.write_release_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Mapping

import numpy as np
from etils import epath

from asda_jax import audio, release_weights, storage
from asda_jax.model import ModelConfig
from asda_jax.release_weights import HUGGING_FACE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VARIANTS = {"pretrain": "pretrained", "finetune": "finetuned"}  # HF variant → export kind
AUDIOSET_CLASSES = release_weights.AUDIOSET_CLASSES  # a pretrained config's default
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2}  # what safetensors' NumPy API reads
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class MalformedWeights(ValueError):
    """A safetensors file whose header does not describe its contents; nothing was read."""


class HubUnavailable(RuntimeError):
    """A hub id was given where the hub cannot be reached (or its client is absent)."""


# ---------------------------------------------------------------------------- files


def read_header(path: os.PathLike) -> dict[str, dict]:
    """The tensors a safetensors file declares ({name: {dtype, shape, data_offsets}}),
    checked against the file's size before anything else is read."""
    path = storage.path(path)
    size = path.stat().length
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise MalformedWeights(f"{path}: {size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if not 2 <= length <= min(_MAX_HEADER_BYTES, size - 8):
            raise MalformedWeights(
                f"{path}: header length {length} does not fit a file of {size} bytes"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedWeights(f"{path}: the header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise MalformedWeights(f"{path}: the header is not a JSON object")
    header.pop("__metadata__", None)
    _check_extents(path, header, size - 8 - length)
    return header


def _check_extents(path, header: dict, data_bytes: int) -> None:
    """Every tensor's byte range matches its dtype and shape, and the ranges tile the
    data section exactly."""
    ranges = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            expected = math.prod(shape)
        except (KeyError, TypeError, ValueError) as e:
            raise MalformedWeights(f"{path}: tensor {name!r} has a malformed entry {entry}") from e
        if dtype not in _ITEM_BYTES:
            raise MalformedWeights(
                f"{path}: tensor {name!r} is {dtype}; only {sorted(_ITEM_BYTES)} are read "
                "(convert the file to float32)"
            )
        expected *= _ITEM_BYTES[dtype]
        if end - begin != expected or begin < 0:
            raise MalformedWeights(
                f"{path}: tensor {name!r} ({dtype} {shape}) spans bytes {begin}..{end}, "
                f"not {expected} bytes"
            )
        ranges.append((begin, end))
    position = 0
    for begin, end in sorted(ranges):
        if begin != position:
            raise MalformedWeights(f"{path}: tensor data overlaps or leaves a gap at {begin}")
        position = end
    if position != data_bytes:
        raise MalformedWeights(
            f"{path}: the tensors declare {position} bytes of data, the file holds {data_bytes}"
        )


class _FileTensors(Mapping):
    """A local safetensors file's tensors, each read when asked for: a conversion holds
    the file's tensors one at a time, not all at once."""

    def __init__(self, path: os.PathLike, names: list[str]):
        from safetensors import safe_open

        self._file = safe_open(os.fspath(path), framework="numpy")
        self._names = names

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_tensors(path: os.PathLike, names: list[str]) -> Mapping[str, np.ndarray]:
    """The tensors of a safetensors file whose header ``read_header`` checked and
    found to hold ``names``, by name (each read on access where the file is local)."""
    from safetensors.numpy import load

    path = storage.path(path)
    if storage.is_remote(path):
        return load(path.read_bytes())
    return _FileTensors(path, names)


def write_tensors(path: os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of ``tensors`` (as the PyTorch side's loaders expect it)."""
    from safetensors.numpy import save

    storage.path(path).write_bytes(save(tensors, metadata={"format": "pt"}))


def resolve(source: str) -> epath.Path:
    """The local (or gs://) model directory ``source`` names; a hub id (``org/name``)
    that is not a local folder is downloaded with huggingface_hub where it is
    installed and the hub can be reached."""
    path = storage.path(source)
    if path.is_dir():
        return path
    if storage.is_remote(path) or not _HUB_ID.fullmatch(source):
        raise FileNotFoundError(f"{source}: no such model directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise HubUnavailable(
            f"{source} is not a local folder, and huggingface_hub is not installed to fetch "
            "it from the hub: pip install huggingface_hub, or download the folder and pass it"
        ) from e
    try:
        folder = snapshot_download(source, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
    except Exception as e:  # the hub client's own errors: offline, unknown repo, auth
        raise HubUnavailable(f"{source}: the Hugging Face hub could not be read ({e})") from e
    return storage.path(folder)


# ---------------------------------------------------------------------------- config

# Values our model cannot hold otherwise: a config with another value is refused.
_FIXED = dict(
    in_chans=1, qkv_bias=True, layer_norm_first=False, norm_eps=1e-6, norm_affine=True,
    fixed_positions=True, start_drop_path_rate=0.0,
)  # fmt: skip
# Training-time dropouts our model does not have; read, reported, not used.
_DROPOUTS = ("drop_rate", "attn_drop_rate", "activation_dropout", "post_mlp_drop")


@dataclasses.dataclass(frozen=True)
class HubModel:
    """What a Hugging Face config.json says, in our terms."""

    model: ModelConfig
    kind: str  # "pretrained" or "finetuned"
    num_classes: int
    target_frames: int
    ignored: dict  # training-time dropouts our model does not have


def read_config(fields: dict, where: str = CONFIG_FILE) -> HubModel:
    """The architecture an EAT-layout config.json describes; refuses what differs."""
    if fields.get("model_type") != "eat":
        raise ValueError(f"{where}: model_type {fields.get('model_type')!r}, not 'eat'")
    wrong = [
        f"{k}={fields[k]!r} (ours: {v!r})"
        for k, v in _FIXED.items()
        if k in fields and fields[k] != v
    ]
    patch = fields.get("patch_size", 16)
    if fields.get("stride", patch) != patch:
        wrong.append(f"stride={fields['stride']!r} (ours: the patch size, {patch})")
    variant = fields.get("model_variant", "pretrain")
    if variant not in VARIANTS:
        wrong.append(f"model_variant={variant!r} (one of {sorted(VARIANTS)})")
    if wrong:
        raise ValueError(f"{where}: values this model cannot hold: {', '.join(wrong)}")
    target_frames, mel_bins = fields.get("img_size", (1024, 128))
    if fields.get("mel_bins", mel_bins) != mel_bins:
        raise ValueError(f"{where}: mel_bins {fields['mel_bins']} but img_size {mel_bins}")
    dim = fields.get("embed_dim", 768)
    model = ModelConfig(
        embed_dim=dim,
        depth=fields.get("depth", 12),
        num_heads=fields.get("num_heads", 12),
        mlp_ratio=float(fields.get("mlp_ratio", 4.0)),
        patch_size=patch,
        num_mel_bins=mel_bins,
        max_time_patches=fields.get("max_length", 768),
        attention="plain",
        drop_path=float(fields.get("end_drop_path_rate", 0.0)),
        decoder_dim=dim,
    ).validate()
    ignored = {k: fields[k] for k in _DROPOUTS if fields.get(k)}
    classes = int(fields.get("num_classes", AUDIOSET_CLASSES))
    return HubModel(model, VARIANTS[variant], classes, int(target_frames), ignored)


def config_fields(model: ModelConfig, kind: str, num_classes: int, target_frames: int) -> dict:
    """The config.json of an EAT-layout directory for a plain-attention model of ours."""
    if model.attention != "plain":
        raise ValueError(
            f"the {model.attention!r} attention form has no Hugging Face (EAT) layout; "
            "export the release form as a fairseq checkpoint (--format=fairseq)"
        )
    variant = {v: k for k, v in VARIANTS.items()}[kind]
    return {
        "model_type": "eat",
        "architectures": ["EATModel"],
        "auto_map": {
            "AutoConfig": "configuration_eat.EATConfig",
            "AutoModel": "modeling_eat.EATModel",
        },
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "num_heads": model.num_heads,
        "mlp_ratio": model.mlp_ratio,
        "patch_size": model.patch_size,
        "stride": model.patch_size,
        "mel_bins": model.num_mel_bins,
        "max_length": model.max_time_patches,
        "num_classes": num_classes,
        "model_variant": variant,
        "img_size": [target_frames, model.num_mel_bins],
        **_FIXED,
        "end_drop_path_rate": model.drop_path,
    }


# ---------------------------------------------------------------------------- models


def layout(hub: HubModel) -> list[release_weights.Tensor]:
    """Every tensor an EAT-layout file of this config holds (the positions apart)."""
    tensors = [
        dataclasses.replace(t, ours=("encoder", *t.ours))
        for t in release_weights.encoder_tensors(hub.model, HUGGING_FACE)
    ]
    if hub.kind == "finetuned":
        tensors += release_weights.head_tensors(hub.model, hub.num_classes, HUGGING_FACE)
    return tensors


def key_report(have: dict[str, tuple[int, ...]], hub: HubModel) -> dict[str, list[str]]:
    """Names the layout needs but the file (``have``: its shapes) lacks, names it does
    not use, and shapes that differ from the config's."""
    want = release_weights.shapes_of(layout(hub))
    want[HUGGING_FACE.positions] = release_weights.positions_table(hub.model).shape
    return release_weights.compare_shapes(have, want)


@dataclasses.dataclass(frozen=True)
class Imported:
    params: dict  # {"encoder"} or {"encoder", "fc_norm", "head"}
    hub: HubModel
    positions_max_difference: float

    def description(self, source: str) -> dict:
        """What ``checkpoints.export`` records of the model's input and head."""
        described = dict(
            source=source, kind=self.hub.kind, target_frames=self.hub.target_frames,
            norm=audio.NORM_STATS["audioset"],
        )  # fmt: skip
        if self.hub.kind == "finetuned":
            described |= release_weights.classifier_description(self.hub.num_classes)
        return described


# A file's positional table farther than this from ours is another table, not ours.
# Float32 sin/cos of angles up to 767 rad, computed in another order, differ by ~1e-4.
POSITIONS_TOLERANCE = 1e-3


def import_model(source: str) -> Imported:
    """An EAT-layout directory (or hub id) as our parameters; raises on any mismatch."""
    directory = resolve(source)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{directory} has no {needed.name}")
    hub = read_config(json.loads(config_path.read_text()), str(config_path))
    header = read_header(weights_path)
    shapes = {name: tuple(entry["shape"]) for name, entry in header.items()}
    problems = {k: v for k, v in key_report(shapes, hub).items() if v}
    if problems:
        raise ValueError(f"{weights_path} does not fit its config.json: {problems}")
    tensors = read_tensors(weights_path, sorted(header))
    distance = release_weights.positions_max_difference(tensors, hub.model, HUGGING_FACE.positions)
    if distance > POSITIONS_TOLERANCE:
        raise ValueError(
            f"{weights_path}: its positional table differs from the fixed sin-cos table by "
            f"{distance:.3g}: not this architecture"
        )
    return Imported(release_weights.to_tree(tensors, layout(hub)), hub, distance)


def export_model(
    directory: os.PathLike, params: dict, model: ModelConfig, target_frames: int
) -> epath.Path:
    """Writes ``params`` ({"encoder"[, "fc_norm", "head"]}) as an EAT-layout directory;
    refuses a non-empty directory."""
    directory = storage.path(directory)
    kind = "finetuned" if "head" in params else "pretrained"
    classes = int(np.shape(params["head"]["bias"])[0]) if "head" in params else AUDIOSET_CLASSES
    fields = config_fields(model, kind, classes, target_frames)
    hub = read_config(fields)
    storage.make_new_folder(directory)
    tensors = release_weights.to_state(params, layout(hub))
    tensors[HUGGING_FACE.positions] = release_weights.positions_table(model)
    write_tensors(directory / WEIGHTS_FILE, tensors)
    (directory / CONFIG_FILE).write_text(json.dumps(fields, indent=2))
    return directory
