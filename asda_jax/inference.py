"""Models loaded from disk for the tools: embeddings of audio files, and their labels.

Sources: a training workdir (its ``config.json`` says the model; the latest or a given
checkpoint holds the weights) or an exported encoder (``model.json`` + ``params/``).
One file is read and encoded at a time at its own length, so files of any duration
(up to the positional table's 122.88 s) and any mix of good and bad files work.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from asda_jax import audio, checkpoints, config_lib
from asda_jax import model as model_lib

PATCH_FRAMES = 16


def run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise checkpoints.CheckpointMismatch(
            f"{workdir} has no config.json: not a workdir written by launch/train.py"
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def model_config_of(path: str | Path) -> model_lib.ModelConfig:
    """The ModelConfig of an export or of a training workdir."""
    description = checkpoints.export_description(path)
    if description is not None:
        fields = config_lib.dataclass_fields(model_lib.ModelConfig, description["model"])
        return model_lib.ModelConfig(**fields)
    return config_lib.model_config(run_config(path))


def abstract_module_params(module: nn.Module, input_shape):
    """The module's params (for an input of ``input_shape``) as ShapeDtypeStructs on the
    first local device: a restore target, or the shapes to check a conversion against."""
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(input_shape))["params"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nn.meta.unbox(boxed)
    )


def load_encoder(path: str | Path, step: int | None = None, which: str = "encoder"):
    """(encode, ModelConfig) of the encoder of an export or a workdir (``which="teacher"``:
    a pretraining export's EMA teacher); ``encode`` maps (B, T, F) spectrograms to
    (B, 1 + N, D) output tokens."""
    cfg = dataclasses.replace(model_config_of(path), drop_path=0.0)
    encoder = model_lib.Encoder(cfg)
    target = abstract_module_params(encoder, (1, PATCH_FRAMES, cfg.num_mel_bins))
    params = checkpoints.restore_params(path, target, (which,), step)
    return jax.jit(lambda spec: encoder.apply({"params": params}, spec).tokens), cfg


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
        return (
            model_config_of(path),
            head,
            ClassifierInput(description.get("target_frames", 1024), norm),
        )
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
    data = config_lib.input_config(config)
    return (
        config_lib.model_config(config),
        head,
        ClassifierInput(data.target_frames, data.norm, data.dataset, data.data_dir),
    )


def load_classifier(path: str | Path, step: int | None = None):
    """(classify, ClassifierInput) of a fine-tuning workdir or a classifier export;
    ``classify`` maps (B, T, F) spectrograms to (B, C) scores (softmax or sigmoid)."""
    model_cfg, head, inputs = classifier_description(path)
    cfg = dataclasses.replace(model_cfg, drop_path=0.0)
    item, prefix = checkpoints.locate_params(path, step)
    num_classes = checkpoints.saved_tree(item, (*prefix, "head", "kernel")).shape[-1]
    classifier = model_lib.Classifier(cfg, num_classes, head["pooling"])
    target = abstract_module_params(classifier, (1, PATCH_FRAMES, cfg.num_mel_bins))
    params = checkpoints.restore_item(item, prefix, target)
    squash = jax.nn.softmax if head["scores"] == "softmax" else jax.nn.sigmoid
    classify = jax.jit(lambda spec: squash(classifier.apply({"params": params}, spec)))
    return classify, dataclasses.replace(inputs, num_classes=num_classes)


def whole_clip(path, norm, max_frames: int) -> np.ndarray:  # (T, 128), T a multiple of 16
    """The normalised spectrogram of a whole file (at most ``max_frames``), its frame
    count rounded up to whole patches (the padding is the normalised silence, as in
    training)."""
    opts = audio.RELEASE_FBANK
    wave = audio.read_audio(path, max_seconds=opts.num_samples(max_frames) / audio.SAMPLE_RATE)
    frames = min(-(-opts.num_frames(wave.size) // PATCH_FRAMES) * PATCH_FRAMES, max_frames)
    spec, _ = audio.spectrogram(wave, frames, norm)
    return spec


def embed(encode, spec: np.ndarray) -> dict[str, np.ndarray]:
    """utterance (D,) = the CLS output, frames (N, D) = the patch outputs (time-major)."""
    tokens = np.asarray(encode(jnp.asarray(spec)[None]), np.float32)[0]
    return {"utterance": tokens[0], "frames": tokens[1:]}


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


def top_k(scores: np.ndarray, names: list[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-scores)[:k]
    return [(names[i], float(scores[i])) for i in order]
