"""Models loaded from disk for the tools: embeddings of audio files, and their labels.

Sources: a training workdir (its ``config.json`` says the model; the latest or a given
checkpoint holds the weights) or an exported encoder (``model.json`` + ``params/``).
Either gives the architecture only: the model computes in this machine's platform
defaults (``platforms.FORMS``), whatever the run that wrote it used. Recordings longer
than the model's input are cut into windows (``windows.py``, ``embeddings.py``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections

from asda_jax import audio, checkpoints, config_lib, platforms, sharding
from asda_jax import model as model_lib


def saved_config(workdir: str | Path) -> dict:
    """The JSON a training run wrote as its ``config.json``, as written."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise checkpoints.CheckpointMismatch(
            f"{workdir} has no config.json: not a workdir written by launch/train.py"
        )
    return json.loads(path.read_text())


def run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    return config_lib.saved_run_config(saved_config(workdir), str(workdir))


def model_config_of(path: str | Path) -> model_lib.ModelConfig:
    """The ModelConfig of an export or of a training workdir (older ones too)."""
    description = checkpoints.export_description(path)
    if description is not None:
        fields = config_lib.without_execution(description["model"], str(path))
    else:
        fields = dict(run_config(path).model)
    try:
        return config_lib.architecture(fields)
    except config_lib.ConfigError as e:
        raise checkpoints.CheckpointMismatch(
            f"{path} does not describe a model of ours: {e}"
        ) from e


def here() -> model_lib.Execution:
    """How a loaded model computes on this process's devices: the platform's defaults."""
    return model_lib.Execution(platform=platforms.of_devices(jax.local_devices()))


def _params_target(module, cfg: model_lib.ModelConfig):
    """``module``'s parameters as a restore target on this process's first device."""
    shapes = model_lib.abstract_params(module, (1, cfg.patch_size, cfg.num_mel_bins))
    return checkpoints.restore_target(shapes, sharding.first_local_device())


RELEASE_INPUT_FRAMES = 1024  # 10.24 s: the release's pretraining and AudioSet input


def input_frames(path: str | Path, cfg: model_lib.ModelConfig) -> int:
    """The input length (fbank frames) the model of an export or a workdir was trained
    on: the export's or the run's ``target_frames``; for exports that do not say, the
    release's 1024 frames (at most the positional table's length)."""
    description = checkpoints.export_description(path)
    if description is None:  # a run's config.json holds every field, resolved
        return int(saved_config(path)["data"]["target_frames"])
    table = cfg.max_time_patches * cfg.patch_size
    return int(description.get("target_frames", min(RELEASE_INPUT_FRAMES, table)))


class LoadedEncoder(NamedTuple):
    encode: object  # (B, T, F) spectrograms[, (B,) frame lengths] -> (B, 1 + N, D), jitted
    cfg: model_lib.ModelConfig
    run: model_lib.Execution
    frames: int  # the input length it was trained on: the windows of long recordings


def load_encoder(path: str | Path, step: int | None = None, which: str = "encoder"):
    """The encoder of an export or a workdir (``which="teacher"``: a pretraining export's
    EMA teacher), computing in this platform's defaults. ``encode(spec, frame_lengths)``
    masks the tokens past each row's frame length (None: every token is real)."""
    cfg = dataclasses.replace(model_config_of(path), drop_path=0.0)
    run = here()
    encoder = model_lib.Encoder(cfg, run=run)
    params = checkpoints.restore_params(path, _params_target(encoder, cfg), (which,), step)

    def encode(spec, frame_lengths=None):
        return encoder.apply({"params": params}, spec, frame_lengths).tokens

    return LoadedEncoder(jax.jit(encode), cfg, run, input_frames(path, cfg))


@dataclasses.dataclass(frozen=True)
class ClassifierInput:
    """What a classifier was trained on: input length, normalisation, its label source
    and (once its head is read) its class count."""

    target_frames: int
    norm: tuple[float, float]
    dataset: str | None = None
    data_dir: str | None = None
    num_classes: int | None = None


def classifier_description(path: str | Path) -> tuple[model_lib.ModelConfig, dict, ClassifierInput]:
    """(ModelConfig, head options {pooling, scores}, input) of an export or a workdir."""
    description = checkpoints.export_description(path)
    if description is not None:
        head = {
            "pooling": description.get("pooling", "cls"),
            "scores": description.get("scores", "sigmoid"),
        }
        norm = tuple(description.get("norm", audio.NORM_STATS["audioset"]))
        inputs = ClassifierInput(description.get("target_frames", RELEASE_INPUT_FRAMES), norm)
        return model_config_of(path), head, inputs
    config = run_config(path)
    if config.task == "pretrain":
        raise checkpoints.CheckpointMismatch(
            f"{path} is a pretraining run: it has no classification head"
        )
    finetune = dict(config.get("finetune") or {})
    head = {
        "pooling": finetune.get("pooling", "cls"),
        "scores": "softmax" if finetune.get("loss") == "ce" else "sigmoid",
    }
    data = config_lib.input_config(config, platform=here().platform)
    inputs = ClassifierInput(data.target_frames, data.norm, data.dataset, data.data_dir)
    return model_config_of(path), head, inputs


def load_classifier(path: str | Path, step: int | None = None):
    """(classify, ClassifierInput) of a fine-tuning workdir or a classifier export;
    ``classify`` maps (B, T, F) spectrograms to (B, C) scores (softmax or sigmoid)."""
    model_cfg, head, inputs = classifier_description(path)
    cfg = dataclasses.replace(model_cfg, drop_path=0.0)
    item, prefix = checkpoints.locate_params(path, step)
    num_classes = checkpoints.saved_tree(item, (*prefix, "head", "kernel")).shape[-1]
    classifier = model_lib.Classifier(cfg, num_classes, head["pooling"], run=here())
    params = checkpoints.restore_item(item, prefix, _params_target(classifier, cfg))
    squash = jax.nn.softmax if head["scores"] == "softmax" else jax.nn.sigmoid
    classify = jax.jit(lambda spec: squash(classifier.apply({"params": params}, spec)))
    return classify, dataclasses.replace(inputs, num_classes=num_classes)


def read_label_names(path: str | Path) -> list[str]:
    """Display names from a label CSV: ``index,mid,display_name`` (AudioSet's
    class_labels_indices.csv, with or without its header) or ``index,name``."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and not rows[0][0].strip().isdigit():
        rows = rows[1:]  # header
    try:
        indexed = sorted((int(r[0]), r[-1].strip()) for r in rows)
    except (ValueError, IndexError) as e:
        raise ValueError(f"{path}: expected rows of index,[mid,]name ({e})") from e
    if [i for i, _ in indexed] != list(range(len(indexed))):
        raise ValueError(f"{path}: class indices must run 0..{len(indexed) - 1}")
    return [name for _, name in indexed]
