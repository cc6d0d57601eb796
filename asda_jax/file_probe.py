"""How well an encoder's embeddings of a labelled folder separate its classes, when the
recordings of one source are held out: linear probes over held-out-source folds.

A probe that trains and tests on recordings of the same source (one microphone, one
sound bank, one speaker) rewards features that recognise the source; holding each
source out in turn asks whether they recognise the class. The folder:

  <folder>/labels.csv         path,label[,group]   (paths relative to the folder;
                                                    group: the recording's source)
  or <folder>/<label>/<file>  class folders (no groups)

With groups, there is one fold per group: train on the others, test on it. Without,
each file is its own source and files are dealt into ``k`` folds, class by class.

Features are computed once per clip: an encoder's patch outputs averaged over the
clip's real time steps (``pooling="mean"``) or its CLS outputs (``"cls"``; both over
windows of the encoder's training length, as the tools cut long audio), or log-mel
statistics per band (mean, spread, maximum and spread of the frame-to-frame change;
the baseline any encoder must beat). The probe is a ridge classifier on standardised
features whose penalty is chosen per fold by the same held-out-source scheme inside
the training part; its score is class-balanced accuracy on the held-out part.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from asda_jax import audio, checkpoints, embeddings, inference, probe, progress, storage
from asda_jax.data import builders

PENALTIES = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class LabelledFile:
    path: str
    label: str
    group: str  # its source; "" when the folder names none


@dataclasses.dataclass(frozen=True)
class Fold:
    name: str  # the held-out group, or "fold k"
    train: np.ndarray  # indices into the files
    test: np.ndarray


def read_labelled_folder(folder: str | os.PathLike) -> list[LabelledFile]:
    """The labelled files of a folder: its labels.csv, or else its class folders."""
    root = Path(folder)
    table = root / "labels.csv"
    if table.is_file():
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise ValueError(f"{table}: needs the columns path,label[,group]")
        return [LabelledFile(str(root / r["path"]), r["label"], r.get("group") or "") for r in rows]
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    files = [
        LabelledFile(str(path), label.name, "")
        for label in sorted(d for d in root.iterdir() if d.is_dir())
        for path in builders.audio_files(label)
    ]
    if not files:
        raise FileNotFoundError(f"{root}: no labels.csv and no files in class folders")
    return files


def held_out_folds(files: Sequence[LabelledFile], k: int = 5) -> list[Fold]:
    """One fold per group (train on the rest), or, when no file names a group, ``k``
    folds with each class's files dealt round-robin. Every file is in exactly one of a
    fold's two parts and in exactly one fold's test part."""
    groups = sorted({str(f.group) for f in files})
    every = np.arange(len(files))
    if groups != [""]:
        if "" in groups or len(groups) < 2:
            raise ValueError(
                f"held-out folds need a group for every file and at least two groups, got "
                f"{groups[:5]}"
            )
        of = np.asarray([f.group for f in files])
        return [Fold(g, every[of != g], every[of == g]) for g in groups]
    place = np.zeros(len(files), int)
    for label in sorted({f.label for f in files}):
        members = [i for i, f in enumerate(files) if f.label == label]
        place[members] = np.arange(len(members)) % k
    return [Fold(f"fold {j + 1}", every[place != j], every[place == j]) for j in range(k)]


def read_waves(
    files: Sequence[LabelledFile], max_seconds: float = 30.0
) -> tuple[list[np.ndarray], list[int], collections.Counter]:
    """(mono 16 kHz waves, the indices of the files they are, skipped files per reason):
    files that are not usable audio are left out and counted."""
    waves, kept, skipped = [], [], collections.Counter()
    for i, f in enumerate(progress.progress(files, "read")):
        try:
            waves.append(audio.read_audio(f.path, max_seconds=max_seconds))
            kept.append(i)
        except audio.AudioError as e:
            skipped[e.reason] += 1
    return waves, kept, skipped


def logmel_statistics(waves: Sequence[np.ndarray]) -> np.ndarray:  # -> (N, 4·M)
    """Per clip and mel band: mean, standard deviation and maximum of the log-mel
    energies over frames, and the standard deviation of their frame-to-frame change."""
    rows = []
    for wave in progress.progress(waves, "log-mel statistics", unit="clips"):
        spec = audio.fbank(wave)  # (T, M)
        change = np.diff(spec, axis=0) if spec.shape[0] > 1 else np.zeros_like(spec)
        rows.append(np.concatenate([spec.mean(0), spec.std(0), spec.max(0), change.std(0)]))
    return np.stack(rows).astype(np.float32)


def encoder_features(
    encoder: inference.LoadedEncoder, waves: Sequence[np.ndarray], pooling: str = "mean"
) -> np.ndarray:  # -> (N, D)
    """Per clip: the encoder's patch outputs averaged over its real time steps
    (``mean``), or its windows' CLS outputs averaged by real frames (``cls``)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    embedder = embeddings.Embedder(encoder)
    rows = []
    batches = range(0, len(waves), 64)  # bounded memory: (64, S, D) steps at a time
    for start in progress.progress(batches, "encode, 64 clips a batch", unit="batches"):
        out = embeddings.embed_clips(embedder, waves[start : start + 64], pooling="mean")
        if pooling == "cls":
            rows.append(out.scene)
        else:
            rows.append(out.steps.sum(1) / out.num_steps[:, None])
    return np.concatenate(rows).astype(np.float32)


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps a training workdir holds checkpoints of, in order."""
    saved = checkpoints.Checkpoints(storage.path(workdir), async_save=False)
    try:
        return sorted(saved.all_steps())
    finally:
        saved.close()


def effective_rank(features: np.ndarray) -> float:
    """exp of the entropy of the normalised singular values of the centred (N, D)
    features: 1 for features that vary along one direction (a collapsed encoder), D
    for features spread evenly over all D."""
    singular = np.linalg.svd(features - features.mean(0), compute_uv=False)
    share = singular / singular.sum()
    share = share[share > 0]
    return float(np.exp(-(share * np.log(share)).sum()))


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    per_fold: dict[str, float]  # held-out group → balanced accuracy
    penalties: dict[str, float]  # held-out group → the ridge penalty chosen

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.per_fold.values())))

    @property
    def spread(self) -> float:  # the standard deviation over folds
        return float(np.std(list(self.per_fold.values())))

    def as_dict(self) -> dict:
        return {"per_fold": self.per_fold, "penalties": self.penalties, "mean": self.mean,
                "spread": self.spread}  # fmt: skip


def fit_and_score(x: np.ndarray, labels: np.ndarray, fold: Fold, l2: float) -> float:
    """Balanced accuracy on ``fold.test`` of a ridge probe fit on ``fold.train``."""
    classes = np.unique(labels[fold.train])
    targets = (labels[fold.train][:, None] == classes[None]).astype(np.float32)
    scores = probe.ridge_predictions(x[fold.train], targets, x[fold.test], l2)
    return probe.balanced_accuracy(labels[fold.test], classes[scores.argmax(1)])


def chosen_penalty(x, labels, files: Sequence[LabelledFile], fold: Fold) -> float:
    """The penalty of PENALTIES that scores best when the training part's own groups
    (or folds) are held out in turn. A training part of one group (a folder of two
    sources) has no group to hold out: its files are then dealt into three folds per
    class, as a folder without groups is."""
    inner_files = [files[i] for i in fold.train]
    if len({f.group for f in inner_files}) < 2:
        inner_files = [dataclasses.replace(f, group="") for f in inner_files]
    inner = held_out_folds(inner_files, k=3)
    sub_x, sub_labels = x[fold.train], labels[fold.train]
    scores = [np.mean([fit_and_score(sub_x, sub_labels, f, l2) for f in inner]) for l2 in PENALTIES]
    return PENALTIES[int(np.argmax(scores))]


def run(features: np.ndarray, files: Sequence[LabelledFile], folds: Sequence[Fold]) -> ProbeResult:
    """The probe's balanced accuracy on each fold's held-out part."""
    labels = np.asarray([f.label for f in files])
    per_fold, penalties = {}, {}
    for fold in folds:
        l2 = chosen_penalty(features, labels, files, fold)
        per_fold[fold.name] = fit_and_score(features, labels, fold, l2)
        penalties[fold.name] = l2
    return ProbeResult(per_fold, penalties)


def table(results: dict[str, ProbeResult], fold_names: Sequence[str]) -> str:
    """A markdown table: one row per feature set, balanced accuracy per held-out fold,
    their mean and spread."""
    head = ["features", *fold_names, "mean", "spread"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [f"{r.per_fold[f]:.3f}" for f in fold_names] + [f"{r.mean:.3f}", f"{r.spread:.3f}"]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)
