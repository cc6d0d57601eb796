"""Models loaded from disk for the tools: embeddings of audio files, and their labels.

Sources: a training workdir (its ``config.json`` says the model and its input; the
latest or a given checkpoint holds the weights) or an export (``model.json`` +
``params/``). Either gives the architecture and the input it was trained on (length,
normalisation), never how it computed: a loaded model computes in this machine's
chip's forms (``hardware.Chip.forms``), whatever the run that wrote it used.
Recordings longer than the model's input are cut into windows (``windows.py``,
``embeddings.py``). Workdirs and exports of another version may be refused: they are
not yet a stable format.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from asda_jax import checkpoints, config_lib, hardware, objectives, sharding, storage
from asda_jax import model as model_lib
from asda_jax.data import datasets


def saved_config(workdir: str | os.PathLike) -> dict:
    """The JSON a training run wrote as its ``config.json``, as written."""
    path = storage.path(workdir) / "config.json"
    if not path.is_file():
        raise checkpoints.CheckpointMismatch(
            f"{workdir} has no config.json: not a workdir written by launch/train.py"
        )
    return json.loads(path.read_text())


def here() -> model_lib.Execution:
    """How a loaded model computes on this process's devices: their chip's forms."""
    return model_lib.Execution(chip=hardware.of_devices(jax.local_devices()).name)


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """What a model was trained on: its input length, normalisation and, for a
    fine-tuning run, its label source and (once its head is read) class count."""

    target_frames: int
    norm: tuple[float, float]
    dataset: str | None = None
    data_dir: str | None = None
    num_classes: int | None = None
    labels: str | None = None  # "audioset": AudioSet's 527 classes (``audioset_label_names``)
    scores: str | None = None  # a classifier's: "softmax" or "sigmoid"
    class_names: tuple[str, ...] | None = None  # an export's own, written with its head


class Description(NamedTuple):
    """What a workdir or an export says about its model."""

    kind: str  # the task that trained it ("pretrain", "finetune", ...; "pretrained" and
    # "finetuned" for the release's checkpoints)
    model: model_lib.ModelConfig
    input: ModelInput
    head: dict | None  # {pooling, scores} of a classifier


def _mismatch(path, e: Exception) -> checkpoints.CheckpointMismatch:
    return checkpoints.CheckpointMismatch(f"{path} does not describe a model of ours: {e}")


def describe(path: str | os.PathLike) -> Description:
    """The model, input and head of an export or of a training workdir."""
    export = checkpoints.export_description(path)
    try:
        return _of_export(export) if export is not None else _of_run(saved_config(path))
    except (config_lib.ConfigError, KeyError, TypeError) as e:
        raise _mismatch(path, e) from e


def _of_export(description: dict) -> Description:
    inputs = ModelInput(
        int(description["target_frames"]),
        tuple(description["norm"]),
        labels=description.get("labels"),
        class_names=tuple(description["class_names"]) if "class_names" in description else None,
    )
    head = None
    if "scores" in description:  # a classifier's
        head = {"pooling": description["pooling"], "scores": description["scores"]}
    model = config_lib.architecture(description["model"])
    return Description(description["kind"], model, inputs, head)


def _of_run(config: dict) -> Description:
    data = config_lib.input_config(config["data"], hardware.HOST)
    inputs = ModelInput(data.target_frames, data.norm, data.dataset, data.data_dir)
    head = None
    if config["task"] != "pretrain":
        finetune = config_lib.typed_block(objectives.FinetuneConfig, config["finetune"])
        scores = "softmax" if finetune.loss == "ce" else "sigmoid"
        head = {"pooling": finetune.pooling, "scores": scores}
    return Description(config["task"], config_lib.architecture(config["model"]), inputs, head)


def _params_target(module, cfg: model_lib.ModelConfig):
    """``module``'s parameters as a restore target on this process's first device."""
    shapes = model_lib.abstract_params(module, (1, cfg.patch_size, cfg.num_mel_bins))
    return checkpoints.restore_target(shapes, sharding.first_local_device())


class LoadedEncoder(NamedTuple):
    encode: object  # (B, T, F) spectrograms[, (B,) frame lengths] -> (B, 1 + N, D), jitted
    cfg: model_lib.ModelConfig
    run: model_lib.Execution
    input: ModelInput  # what it was trained on: the windows of long recordings, the norm


def encoder_parts(
    path: str | os.PathLike,
    step: int | None = None,
    which: str = "encoder",
    run: model_lib.Execution | None = None,
) -> tuple[model_lib.Encoder, dict, ModelInput]:
    """(module, parameters, input) of the encoder of an export or a workdir, computing
    in ``run``'s forms (default: this chip's)."""
    encoder, inputs = _encoder_of(path, run)
    target = _params_target(encoder, encoder.cfg)
    return encoder, checkpoints.restore_params(path, target, (which,), step), inputs


def load_encoder(path: str | os.PathLike, step: int | None = None, which: str = "encoder"):
    """The encoder of an export or a workdir (``which="teacher"``: a pretraining run's
    EMA teacher), computing in this chip's forms. ``encode(spec, frame_lengths)`` masks
    the tokens past each row's frame length (None: every token is real)."""
    return _loaded(*encoder_parts(path, step, which))


def random_encoder(path: str | os.PathLike, seed: int = 0):
    """An encoder of the architecture and input of an export or a workdir, at random
    initialisation (the baseline a trained one is compared with)."""
    encoder, inputs = _encoder_of(path)
    shape = (1, encoder.cfg.patch_size, encoder.cfg.num_mel_bins)
    variables = encoder.init(jax.random.PRNGKey(seed), jnp.zeros(shape, jnp.float32))
    return _loaded(encoder, nn.meta.unbox(variables)["params"], inputs)


def _encoder_of(path: str | os.PathLike, run: model_lib.Execution | None = None):
    """The encoder module (no dropout; ``run``'s forms, default this chip's) and input
    of a description."""
    description = describe(path)
    cfg = dataclasses.replace(description.model, drop_path=0.0)
    return model_lib.Encoder(cfg, run=run or here()), description.input


def _loaded(encoder: model_lib.Encoder, params, inputs: ModelInput) -> LoadedEncoder:
    # The parameters are an argument, not a closure: a closure would embed them in
    # the program as constants (slow to compile, and copied into every executable).
    @jax.jit
    def encode_with(params, spec, frame_lengths):
        return encoder.apply({"params": params}, spec, frame_lengths).tokens

    def encode(spec, frame_lengths=None):
        return encode_with(params, spec, frame_lengths)

    return LoadedEncoder(encode, encoder.cfg, encoder.run, inputs)


class LoadedClassifier(NamedTuple):
    classify: object  # (B, T, F) spectrograms[, (B,) frame lengths] -> (B, C) scores, jitted
    cfg: model_lib.ModelConfig
    input: ModelInput  # what it was trained on, with its class count


def load_classifier(path: str | os.PathLike, step: int | None = None) -> LoadedClassifier:
    """The classifier of a fine-tuning workdir or a classifier export, computing in this
    chip's forms; ``classify(spec, frame_lengths)`` maps (B, T, F) spectrograms to (B, C) scores
    (softmax or sigmoid), masking the tokens past each row's real frames, rounded up to
    whole time patches (None: every token is real)."""
    classifier, params, inputs = classifier_parts(path, step)
    scores = jax.jit(classifier_scores(classifier, inputs))  # parameters an argument: _loaded
    patch = classifier.cfg.patch_size

    def classify(spec, frame_lengths=None):
        if frame_lengths is not None:  # a part patch at the end counts as real, as in extract
            frame_lengths = -(-np.asarray(frame_lengths) // patch) * patch
        return scores(params, spec, frame_lengths)

    return LoadedClassifier(classify, classifier.cfg, inputs)


def classifier_parts(
    path: str | os.PathLike, step: int | None = None, run: model_lib.Execution | None = None
) -> tuple[model_lib.Classifier, dict, ModelInput]:
    """(module, parameters, input with its class count) of the classifier of a
    fine-tuning workdir or a classifier export, computing in ``run``'s forms (default:
    this chip's)."""
    description = describe(path)
    if description.head is None:
        raise checkpoints.CheckpointMismatch(
            f"{path} is a pretraining run: it has no classification head"
        )
    cfg = dataclasses.replace(description.model, drop_path=0.0)
    item, prefix = checkpoints.locate_params(path, step)
    num_classes = checkpoints.saved_tree(item, (*prefix, "head", "kernel")).shape[-1]
    pooling = description.head["pooling"]
    classifier = model_lib.Classifier(cfg, num_classes, pooling, run=run or here())
    params = checkpoints.restore_item(item, prefix, _params_target(classifier, cfg))
    inputs = dataclasses.replace(
        description.input, num_classes=num_classes, scores=description.head["scores"]
    )
    return classifier, params, inputs


def classifier_scores(classifier: model_lib.Classifier, inputs: ModelInput):
    """The pure function (params, (B, T, F) spectrograms, (B,) frame lengths or None)
    → (B, C) scores: the logits through the model's softmax or sigmoid."""
    squash = jax.nn.softmax if inputs.scores == "softmax" else jax.nn.sigmoid

    def scores(params, spec, frame_lengths):
        return squash(classifier.apply({"params": params}, spec, frame_lengths))

    return scores


def class_names(inputs: ModelInput, labels: str | os.PathLike | None = None) -> list[str]:
    """A classifier's display names: from ``labels`` (a label CSV), else those its export
    holds, else its run's prepared dataset, else AudioSet's for a model that says it was
    trained on them."""
    if labels:
        names = read_label_names(labels)
    elif inputs.class_names is not None:
        names = list(inputs.class_names)
    elif inputs.dataset is not None:
        names = datasets.load(inputs.dataset, inputs.data_dir).class_names
    elif inputs.labels == "audioset":
        names = audioset_label_names()
    else:
        raise ValueError("this checkpoint does not name its classes: pass --labels")
    if len(names) != inputs.num_classes:
        raise ValueError(f"{len(names)} label names for a head of {inputs.num_classes} classes")
    return names


AUDIOSET_LABELS = epath.resource_path("asda_jax.data") / "audioset_labels.csv"


def audioset_label_names() -> list[str]:
    """AudioSet's 527 display names in class order (the ontology's
    class_labels_indices.csv, shipped with the package: ``docs/weights.md``)."""
    return read_label_names(AUDIOSET_LABELS)


def read_label_names(path: str | os.PathLike) -> list[str]:
    """Display names from a label CSV: ``index,mid,display_name`` (AudioSet's
    class_labels_indices.csv, with or without its header) or ``index,name``."""
    rows = [r for r in csv.reader(io.StringIO(storage.path(path).read_text())) if r]
    if rows and not rows[0][0].strip().isdigit():
        rows = rows[1:]  # header
    try:
        indexed = sorted((int(r[0]), r[-1].strip()) for r in rows)
    except (ValueError, IndexError) as e:
        raise ValueError(f"{path}: expected rows of index,[mid,]name ({e})") from e
    if [i for i, _ in indexed] != list(range(len(indexed))):
        raise ValueError(f"{path}: class indices must run 0..{len(indexed) - 1}")
    return [name for _, name in indexed]
