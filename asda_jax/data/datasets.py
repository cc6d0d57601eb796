"""Preparing datasets from local sources, and opening prepared ones for reading."""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from asda_jax import storage
from asda_jax.data import builders
from asda_jax.data.audioset import AudioSet

BUILDERS: dict[str, type[builders.AudioSourceBuilder]] = {
    "audioset": AudioSet,
    "esc50": builders.Esc50,
    "speech_commands_v2": builders.SpeechCommandsV2,
    "audio_folder": builders.AudioFolder,
    "unlabelled_folder": builders.UnlabelledFolder,
    "synthetic": builders.Synthetic,
}


PREPARED_MARK = "dataset_info.json"  # TFDS writes it once a version is complete


class DatasetNotFoundError(FileNotFoundError):
    """A dataset that has not been prepared under the given data_dir."""


def builder_class(name: str) -> type[builders.AudioSourceBuilder]:
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; one of {sorted(BUILDERS)}")
    return BUILDERS[name]


def prepare(
    name: str,
    data_dir: str | os.PathLike,
    *,
    source_dir: str | Path | None = None,
    **options,
) -> PreparedDataset:
    """Builds ``name`` from ``source_dir`` into ``data_dir`` (a folder, or a ``gs://``
    URL: array_record has no writer for buckets, so it is built in a local temporary
    folder and uploaded).

    A dataset already prepared there is reused as it is; to rebuild, remove its folder.
    """
    if storage.is_remote(data_dir):
        return _prepare_and_upload(name, storage.path(data_dir), source_dir, options)
    tfds.disable_progress_bar()
    builder = builder_class(name)(data_dir=str(data_dir), source_dir=source_dir, **options)
    if Path(builder.data_dir).exists():
        logging.info("%s already prepared in %s (remove it to rebuild)", name, builder.data_dir)
        return load(name, data_dir)
    builder.download_and_prepare(file_format="array_record")
    for split, weights in builder.sample_weights.items():
        np.save(Path(builder.data_dir) / builders.WEIGHTS_FILE.format(split=split), weights)
    dataset = load(name, data_dir)
    logging.info("%s prepared in %s: %s", name, dataset.directory, dataset.split_sizes)
    return dataset


def _prepare_and_upload(
    name: str, data_dir: epath.Path, source_dir, options: dict
) -> PreparedDataset:
    try:
        return load(name, data_dir)
    except DatasetNotFoundError:
        pass
    with tempfile.TemporaryDirectory(prefix="asda-jax-prepare-") as local:
        prepare(name, local, source_dir=source_dir, **options)
        # dataset_info.json marks a version prepared (``load``): it goes up last, so an
        # upload cut short is not taken for a prepared dataset.
        uploaded = storage.copy_tree(
            epath.Path(local) / name, data_dir / name, last=(PREPARED_MARK,)
        )
    logging.info("%s: uploaded %d files to %s", name, len(uploaded), data_dir / name)
    return load(name, data_dir)


def load(name: str, data_dir: str | os.PathLike) -> PreparedDataset:
    """Opens the newest prepared version of ``name`` under ``data_dir``."""
    root = storage.path(data_dir) / name
    if storage.is_remote(root):
        storage.require_bucket(root)
    versions = sorted(p for p in root.glob("*") if (p / PREPARED_MARK).exists())
    if not versions:
        raise DatasetNotFoundError(
            f"dataset {name!r} is not prepared under {data_dir} (no {root}/<version>/"
            f"dataset_info.json). Prepare it with: python launch/prepare_data.py "
            f"--dataset={name} --data_dir={data_dir}"
            + ("" if name == "synthetic" else " --source=<your copy of the dataset>")
        )
    return PreparedDataset(name, versions[-1])


def class_count(name: str, data_dir: str | os.PathLike) -> int:
    """Classes of ``name``: the prepared dataset's, else the count the dataset fixes
    (AudioSet, ESC-50, Speech Commands), so a step compiles before any data exists."""
    try:
        return load(name, data_dir).num_classes
    except DatasetNotFoundError:
        fixed = builder_class(name).NUM_CLASSES
        if fixed is None:
            raise
        return fixed


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset on disk: its splits, classes and per-split sidecars."""

    name: str
    directory: epath.Path

    @functools.cached_property
    def builder(self) -> tfds.core.DatasetBuilder:
        return tfds.builder_from_directory(str(self.directory))

    @property
    def class_names(self) -> list[str]:
        return list(self.builder.info.metadata["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def split_sizes(self) -> dict[str, int]:
        return {name: info.num_examples for name, info in self.builder.info.splits.items()}

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        return dict(self.builder.info.metadata.get("skipped", {}))

    def source(self, split: str):
        """Random-access records of ``split`` (TFDS split syntax, e.g. ``fold1+fold2``)."""
        for part in split.split("+"):
            base = part.split("[")[0]
            if base not in self.split_sizes:
                raise ValueError(f"{self.name} has no split {base!r}; splits: {self.split_sizes}")
        return self.builder.as_data_source(split=split)

    def sample_weights(self, split: str) -> np.ndarray | None:
        """Balanced-sampling weights aligned with ``source(split)``, or None without them."""
        if "[" in split:
            raise ValueError(f"sample weights need whole splits, not a slice: {split!r}")
        parts = [self.directory / builders.WEIGHTS_FILE.format(split=p) for p in split.split("+")]
        if not all(p.exists() for p in parts):
            return None
        return np.concatenate([_read_npy(p) for p in parts])


def _read_npy(path: epath.Path) -> np.ndarray:
    with path.open("rb") as f:
        return np.load(f)
