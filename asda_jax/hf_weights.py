"""Hugging Face model directories ↔ our parameters: EAT's layout (EAT, SSLAM) read, and
our models (both attention forms) written as folders transformers loads as they stand.

A directory holds ``config.json`` and ``model.safetensors`` (the fairseq names renamed
one to one: ``release_weights.HUGGING_FACE``). Reading runs no code of theirs: the JSON
is parsed, the safetensors header is checked here before any tensor is read, then the
tensors come through safetensors' NumPy API. Every config field our model cannot
represent, and every tensor the layout does not name or names with another shape, is
refused by name (``docs/weights.md``). Two configs are read: EAT's (``model_type``
"eat", plain attention) and ours ("asda", either form).

Writing (``export_model``) makes a folder of ours: the same tensor names (the
differential form's ``attn.qk``, ``v``, ``norm`` and ``proj`` beside EAT's
``attn.qkv``), a config.json whose ``auto_map`` names the PyTorch code written into
the folder (``asda_jax/hf_code``: the model, its configuration and its feature
extractor, the project's own, needing torch and transformers only), the feature
extractor's ``preprocessor_config.json``, the class names, and a model card.
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
PREPROCESSOR_FILE = "preprocessor_config.json"
CARD_FILE = "README.md"
CODE = epath.resource_path("asda_jax") / "hf_code"  # written into every folder we export
CODE_FILES = ("configuration_asda.py", "modeling_asda.py", "feature_extraction_asda.py")
AUTO_MAP = {
    "AutoConfig": "configuration_asda.ASDAConfig",
    "AutoModel": "modeling_asda.ASDAModel",
    "AutoModelForAudioClassification": "modeling_asda.ASDAForAudioClassification",
    "AutoFeatureExtractor": "feature_extraction_asda.ASDAFeatureExtractor",
}
PROBLEM_TYPES = {"sigmoid": "multi_label_classification", "softmax": "single_label_classification"}
VARIANTS = {"pretrain": "pretrained", "finetune": "finetuned"}  # HF variant → export kind
AUDIOSET_CLASSES = release_weights.AUDIOSET_CLASSES  # a pretrained config's default
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2}  # what safetensors' NumPy API reads
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
HUB_PREFIX = "hf://"  # how a hub repository is asked for


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
    """The local (or gs://) model directory ``source`` names, or, asked for as
    ``hf://org/name``, a hub repository downloaded with huggingface_hub (where it is
    installed and the hub can be reached). A path that does not exist is a missing path,
    never a hub id."""
    if source.startswith(HUB_PREFIX):
        return _downloaded(source[len(HUB_PREFIX) :])
    path = storage.path(source)
    if path.is_dir():
        return path
    hint = f" (a hub repository is named hf://{source})" if _HUB_ID.fullmatch(source) else ""
    raise FileNotFoundError(f"{source}: no such model directory{hint}")


def _downloaded(source: str) -> epath.Path:
    if not _HUB_ID.fullmatch(source):
        raise FileNotFoundError(f"hf://{source}: a hub repository is hf://<org>/<name>")
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
# What an EAT config.json may hold: the fields read below, the fixed and ignored ones,
# and what transformers writes into every config. Anything else is refused by name.
_EAT_FIELDS = {
    "model_type", "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "stride",
    "mel_bins", "max_length", "img_size", "num_classes", "model_variant",
    "end_drop_path_rate", *_FIXED, *_DROPOUTS,
}  # fmt: skip
_TRANSFORMERS_FIELDS = {
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "id2label", "label2id", "problem_type", "return_dict",
    "output_hidden_states", "output_attentions", "use_cache", "is_encoder_decoder",
    "tie_word_embeddings", "chunk_size_feed_forward", "pruned_heads", "initializer_range",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class HubModel:
    """What a Hugging Face config.json says, in our terms."""

    model: ModelConfig
    kind: str  # "pretrained" or "finetuned"
    num_classes: int
    target_frames: int
    ignored: dict  # training-time dropouts our model does not have
    norm: tuple[float, float] = audio.NORM_STATS["audioset"]
    head: dict | None = None  # a classifier's {pooling, scores}; None: the authors'
    names: list[str] | None = None  # class names, where the folder gives its own


def read_config(fields: dict, where: str = CONFIG_FILE) -> HubModel:
    """The architecture a config.json describes (EAT's or ours); refuses what differs."""
    if fields.get("model_type") == "asda":
        return read_asda_config(fields, where)
    if fields.get("model_type") != "eat":
        raise ValueError(f"{where}: model_type {fields.get('model_type')!r}, not 'eat' or 'asda'")
    unknown = sorted(set(fields) - _EAT_FIELDS - _TRANSFORMERS_FIELDS)
    if unknown:
        raise ValueError(f"{where}: fields this model does not have: {unknown}")
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


def read_asda_config(fields: dict, where: str = CONFIG_FILE) -> HubModel:
    """The architecture, input and head of a folder this module wrote."""
    try:
        model = ModelConfig(
            embed_dim=fields["embed_dim"], depth=fields["depth"], num_heads=fields["num_heads"],
            mlp_ratio=float(fields["mlp_ratio"]), patch_size=fields["patch_size"],
            num_mel_bins=fields["num_mel_bins"], max_time_patches=fields["max_time_patches"],
            attention=fields["attention"], diff_lambda=float(fields["diff_lambda"]),
            attn_out_scale=float(fields["attn_out_scale"]), decoder_dim=fields["embed_dim"],
        ).validate()  # fmt: skip
        norm = (float(fields["norm_mean"]), float(fields["norm_std"]))
        classifier = fields["architectures"] == ["ASDAForAudioClassification"]
        target_frames = int(fields["target_frames"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: not a config asda-jax wrote ({e})") from e
    if not classifier:
        return HubModel(model, "pretrained", AUDIOSET_CLASSES, target_frames, {}, norm)
    labels = fields.get("id2label", {})
    names = [labels.get(str(i), labels.get(i)) for i in range(len(labels))]
    if not names or None in names:
        raise ValueError(f"{where}: id2label must name classes 0..{len(labels) - 1}")
    scores = {v: k for k, v in PROBLEM_TYPES.items()}.get(fields.get("problem_type"))
    if scores is None or fields.get("pooling") not in ("cls", "mean"):
        raise ValueError(
            f"{where}: problem_type {fields.get('problem_type')!r} and pooling "
            f"{fields.get('pooling')!r}: one of {sorted(PROBLEM_TYPES.values())}, cls or mean"
        )
    head = {"pooling": fields["pooling"], "scores": scores}
    return HubModel(model, "finetuned", len(names), target_frames, {}, norm, head, names)


def config_fields(model: ModelConfig, kind: str, num_classes: int, target_frames: int) -> dict:
    """The config.json of an EAT-layout directory for a plain-attention model (EAT's
    own config, as the authors' uploads carry it)."""
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
    not use, and shapes that differ from the config's. Refuses first, by arithmetic
    alone, a config whose depth asks for more tensors than the file holds and a block
    more (so an untrusted config's numbers never size a loop or an array beyond what
    the file itself holds; a few missing tensors are still named)."""
    expected, per_block = tensor_count(hub)
    if expected > len(have) + per_block:
        raise ValueError(
            f"the config describes {expected} tensors (depth {hub.model.depth}), "
            f"the file holds {len(have)}"
        )
    want = release_weights.shapes_of(layout(hub))
    m = hub.model
    want[HUGGING_FACE.positions] = (1, m.max_time_patches * m.freq_patches, m.embed_dim)
    return release_weights.compare_shapes(have, want)


def tensor_count(hub: HubModel) -> tuple[int, int]:
    """(tensors of ``hub``'s layout, the positions apart; tensors a block adds), from a
    one- and a two-block layout."""
    one, two = (
        len(layout(dataclasses.replace(hub, model=dataclasses.replace(hub.model, depth=d))))
        for d in (1, 2)
    )
    return one + (two - one) * (hub.model.depth - 1), two - one


@dataclasses.dataclass(frozen=True)
class Imported:
    params: dict  # {"encoder"} or {"encoder", "fc_norm", "head"}
    hub: HubModel
    positions_max_difference: float

    def description(self, source: str) -> dict:
        """What ``checkpoints.export`` records of the model's input and head."""
        described = dict(
            source=source, kind=self.hub.kind, target_frames=self.hub.target_frames,
            norm=self.hub.norm,
        )  # fmt: skip
        if self.hub.kind == "finetuned":
            described |= self.hub.head or release_weights.classifier_description(
                self.hub.num_classes
            )
        return described


# A file's positional table farther than this from ours is another table, not ours.
# Float32 sin/cos of angles up to 767 rad, computed in another order, differ by ~1e-4.
POSITIONS_TOLERANCE = 1e-3


def import_model(source: str) -> Imported:
    """A directory (EAT's or ours; ``hf://org/name``: from the hub) as our parameters;
    raises on any mismatch."""
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


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What a model card says of the run a model came from (what is known of it)."""

    task: str  # "pretrain", "finetune", ...
    dataset: str | None = None
    steps: int | None = None
    evaluation: dict | None = None  # the run's eval.json


def asda_config_fields(
    model: ModelConfig,
    target_frames: int,
    norm: tuple[float, float],
    head: dict | None,
    names: list[str] | None,
) -> dict:
    """The config.json of a folder of ours: ``modeling_asda.ASDAConfig``'s fields."""
    if model.attention not in ("asda", "plain"):
        raise ValueError(
            f"the {model.attention!r} attention form has no PyTorch layout; "
            "train the release form ('asda') or plain attention to export it"
        )
    fields = {
        "model_type": "asda",
        "architectures": ["ASDAForAudioClassification" if head else "ASDAModel"],
        "auto_map": AUTO_MAP,
        "embed_dim": model.embed_dim, "depth": model.depth, "num_heads": model.num_heads,
        "mlp_ratio": model.mlp_ratio, "patch_size": model.patch_size,
        "num_mel_bins": model.num_mel_bins, "max_time_patches": model.max_time_patches,
        "attention": model.attention, "diff_lambda": model.diff_lambda,
        "attn_out_scale": model.attn_out_scale, "target_frames": int(target_frames),
        "norm_mean": float(norm[0]), "norm_std": float(norm[1]),
    }  # fmt: skip
    if head:
        fields |= {
            "pooling": head["pooling"],
            "problem_type": PROBLEM_TYPES[head["scores"]],
            "id2label": {str(i): name for i, name in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)},
        }
    return fields


def preprocessor_fields(model: ModelConfig, target_frames: int, norm) -> dict:
    """``feature_extraction_asda.ASDAFeatureExtractor``'s preprocessor_config.json."""
    return {
        "feature_extractor_type": "ASDAFeatureExtractor",
        "auto_map": {"AutoFeatureExtractor": AUTO_MAP["AutoFeatureExtractor"]},
        "feature_size": model.num_mel_bins,
        "sampling_rate": audio.SAMPLE_RATE,
        "target_frames": int(target_frames),
        "norm_mean": float(norm[0]),
        "norm_std": float(norm[1]),
        "padding_value": 0.0,
        "return_attention_mask": False,
    }


def export_model(
    directory: os.PathLike,
    params: dict,
    model: ModelConfig,
    target_frames: int,
    *,
    norm: tuple[float, float] = audio.NORM_STATS["audioset"],
    head: dict | None = None,
    names: list[str] | None = None,
    provenance: Provenance | None = None,
) -> epath.Path:
    """Writes ``params`` ({"encoder"[, "fc_norm", "head"]}) as a folder transformers
    loads (``AutoModel``/``AutoModelForAudioClassification``/``AutoFeatureExtractor``
    with ``trust_remote_code=True``); refuses a non-empty directory. A classifier needs
    its ``head`` ({pooling, scores}); ``names`` default to "class 0", "class 1", ..."""
    directory = storage.path(directory)
    classes = int(np.shape(params["head"]["bias"])[0]) if "head" in params else 0
    if classes and head is None:
        raise ValueError("a classifier's folder needs its head: {pooling, scores}")
    head = head if classes else None
    names = list(names) if names else [f"class {i}" for i in range(classes)]
    if classes and len(names) != classes:
        raise ValueError(f"{len(names)} class names for a head of {classes} classes")
    fields = asda_config_fields(model, target_frames, norm, head, names)
    hub = read_config(fields)
    storage.make_new_folder(directory)
    tensors = release_weights.to_state(params, layout(hub))
    tensors[HUGGING_FACE.positions] = release_weights.positions_table(model)
    write_tensors(directory / WEIGHTS_FILE, tensors)
    (directory / CONFIG_FILE).write_text(json.dumps(fields, indent=2))
    preprocessor = preprocessor_fields(model, target_frames, norm)
    (directory / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor, indent=2))
    for name in CODE_FILES:
        (directory / name).write_text((CODE / name).read_text())
    card = model_card(hub, provenance or Provenance("unknown"), directory.name)
    (directory / CARD_FILE).write_text(card)
    return directory


def model_card(hub: HubModel, provenance: Provenance, name: str) -> str:
    """The folder's README.md: what the model is, what it takes, where it came from,
    how to load it, and the citation."""
    m, classifier = hub.model, hub.kind == "finetuned"
    form = "differential attention (ASDA)" if m.attention == "asda" else "plain attention (EAT)"
    seconds = audio.RELEASE_FBANK.num_samples(hub.target_frames) / audio.SAMPLE_RATE
    auto = "AutoModelForAudioClassification" if classifier else "AutoModel"
    rows = [
        ("architecture", f"{form}: {m.depth} blocks, {m.embed_dim} wide, {m.num_heads} heads, "
                         f"MLP ratio {m.mlp_ratio}, {m.patch_size}×{m.patch_size} patches"),
        ("input", f"16 kHz mono; Kaldi fbank, {m.num_mel_bins} mel bins, {hub.target_frames} "
                  f"frames ({seconds:.2f} s), normalised as (x − {hub.norm[0]}) / "
                  f"(2 · {hub.norm[1]})"),
        ("output", f"{hub.num_classes} classes, {hub.head['pooling']} pooling, "
                   f"{hub.head['scores']} scores" if classifier
                   else f"tokens (batch, 1 + patches, {m.embed_dim}): the CLS token first"),
        ("trained", f"{provenance.task} on {provenance.dataset or 'an unrecorded dataset'}, "
                    + (f"{provenance.steps} steps" if provenance.steps is not None
                       else "steps not recorded")),
        ("evaluation", ", ".join(f"{k} {v:.4f}" for k, v in (provenance.evaluation or {}).items()
                                 if isinstance(v, int | float)) or "none recorded"),
    ]  # fmt: skip
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    pipeline = "audio-classification" if classifier else "feature-extraction"
    use = (
        'classify = pipeline("audio-classification", model="MODEL", trust_remote_code=True)\n'
        'classify({"array": waveform, "sampling_rate": 16000})  # top labels'
        if classifier
        else 'inputs = extractor(waveform, sampling_rate=16000, return_tensors="pt")\n'
        "tokens = model(**inputs).last_hidden_state  # (1, 1 + patches, D)"
    ).replace("MODEL", name)
    jax_use = (
        f"python launch/infer.py --checkpoint=exports/{name} --audio=clip.wav"
        if classifier
        else f"python launch/extract.py --checkpoint=exports/{name} --audio=clip.wav --output=emb/"
    )
    return f"""---
library_name: transformers
pipeline_tag: {pipeline}
tags: [audio, asda, audio-spectrogram-transformer, asda-jax]
---

# {name}

An audio spectrogram transformer exported by asda-jax (JAX/Flax), in PyTorch code of
its own (`modeling_asda.py`, `configuration_asda.py`, `feature_extraction_asda.py`,
in this folder): loading needs `torch` and `transformers` only.

| | |
|---|---|
{table}

## PyTorch (transformers)

```python
from transformers import AutoFeatureExtractor, {auto}, pipeline

extractor = AutoFeatureExtractor.from_pretrained("{name}", trust_remote_code=True)
model = {auto}.from_pretrained("{name}", trust_remote_code=True)
{use}
```

Clips longer than the input are cropped to it by the feature extractor; asda-jax's
`launch/infer.py` and `extract.py` cut long recordings into windows instead.

## JAX (asda-jax)

```bash
python launch/convert_torch.py --checkpoint={name} --output=exports/{name}
{jax_use}
```

## Citation

```bibtex
@inproceedings{{wang2025asda,
  title={{ASDA: Audio Spectrogram Differential Attention Mechanism for Self-Supervised
         Representation Learning}},
  author={{J. Wang and T. Wang and M. Ge and L. Wang and J. Dang}},
  booktitle={{Interspeech}},
  year={{2025}},
  note={{arXiv:2507.02666}}
}}
```
"""
