"""AudioSet from local files: AudioSet's own segment CSVs, or the release's manifests.

Splits: ``balanced_train`` (AS-20K), ``unbalanced_train`` and ``eval`` from the segment
CSVs (AS-2M training is ``balanced_train+unbalanced_train``), or ``train`` and ``eval``
from the release's ``.tsv``/``.lbl`` manifests. Clips that are listed but not on disk are
counted as ``missing``, as AudioSet downloads are never complete.

Training splits get balanced-sampling weights, written beside the records as
``sample_weights-<split>.npy``: weight(clip) = Σ over its labels of 1000 / (n(label) + 0.01),
n counted over all training clips of the source (AST / Audio-MAE practice; the release
ships its weight file without the script that made it).
"""

from __future__ import annotations

import collections
import csv
from pathlib import Path

from asda_jax.data.builders import AudioSourceBuilder, ClipRef, audio_files

SEGMENT_SPLITS = ("balanced_train", "unbalanced_train", "eval")
MANIFEST_SPLITS = ("train", "eval")
TRAIN_SPLITS = ("balanced_train", "unbalanced_train", "train")
MIN_MANIFEST_SAMPLES = 10_000  # the release skips shorter manifest entries


class AudioSet(AudioSourceBuilder, skip_registration=True):
    """AudioSet (527 classes, multi-label) from local audio and its label files."""

    name = "audioset"
    NUM_CLASSES = 527
    MAX_SECONDS = 10.5  # 1024 frames need 10.255 s
    LAYOUT = """
Either AudioSet's own files:
  <source>/class_labels_indices.csv                   index,mid,display_name (with header)
  <source>/{balanced_train,unbalanced_train,eval}_segments.csv   (any of them)
  <source>/audio/{balanced_train,unbalanced_train,eval}/<file>   named <ytid>.*, Y<ytid>.*
                                                                 or <ytid>_<start>.*
or the release's manifests:
  <source>/label_descriptors.csv                      index,mid,display_name (no header)
  <source>/{train,eval}.tsv     first line: audio root; then relative/path<TAB>num_samples
  <source>/{train,eval}.lbl     clip_id<TAB>mid,mid,... (one line per tsv entry)
"""

    def list_splits(self, source):
        if (source / "class_labels_indices.csv").exists():
            return self._from_segments(source)
        if (source / "label_descriptors.csv").exists():
            return self._from_manifests(source)
        raise self.layout_error("neither class_labels_indices.csv nor label_descriptors.csv found")

    def clip_weights(self, splits):
        counts: collections.Counter = collections.Counter()
        for split in TRAIN_SPLITS:
            for ref in splits.get(split, []):
                counts.update(ref.label_ids)
        return {
            split: [
                sum(1000.0 / (counts[i] + 0.01) for i in ref.label_ids) for ref in splits[split]
            ]
            for split in TRAIN_SPLITS
            if split in splits
        }

    # -- AudioSet's own files --------------------------------------------------------

    def _from_segments(self, source: Path):
        mids, names = _read_label_table(source / "class_labels_indices.csv", header=True)
        splits = {}
        for split in SEGMENT_SPLITS:
            segments_csv = source / f"{split}_segments.csv"
            if not segments_csv.exists():
                continue
            segments = _read_segments(segments_csv)
            files = _index_by_youtube_id(source / "audio" / split, set(segments))
            splits[split] = [
                ClipRef(str(files.get(ytid, source / "audio" / split / f"{ytid}.missing")),
                        _label_ids(labels, mids, segments_csv), ytid)
                for ytid, labels in segments.items()
            ]  # fmt: skip
        if not splits:
            raise self.layout_error("no <split>_segments.csv found")
        return splits, names

    # -- the release's manifests -------------------------------------------------------

    def _from_manifests(self, source: Path):
        mids, names = _read_label_table(source / "label_descriptors.csv", header=False)
        splits = {}
        for split in MANIFEST_SPLITS:
            tsv, lbl = source / f"{split}.tsv", source / f"{split}.lbl"
            if not tsv.exists():
                continue
            lines = tsv.read_text().splitlines()
            root = Path(lines[0].strip())
            label_lines = self.require(lbl).read_text().splitlines()
            if len(label_lines) != len(lines) - 1:
                raise self.layout_error(
                    f"{lbl} has {len(label_lines)} lines for {len(lines) - 1} clips"
                )
            refs = []
            for entry, label_line in zip(lines[1:], label_lines, strict=True):
                relative, num_samples = entry.split("\t")
                if int(num_samples) < MIN_MANIFEST_SAMPLES:
                    continue
                clip_id, _, labels = label_line.partition("\t")
                refs.append(
                    ClipRef(str(root / relative), _label_ids(labels, mids, lbl), clip_id.strip())
                )
            splits[split] = refs
        if not splits:
            raise self.layout_error("no train.tsv or eval.tsv found")
        return splits, names


def _read_label_table(path: Path, *, header: bool) -> tuple[dict[str, int], list[str]]:
    """(mid → index, display names) from an index,mid,display_name table."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = rows[1:] if header else rows
    mids = {row[1]: int(row[0]) for row in rows}
    names = [""] * len(rows)
    for row in rows:
        names[int(row[0])] = row[2]
    return mids, names


def _read_segments(path: Path) -> dict[str, str]:
    """YouTube id → comma-separated label mids, from an AudioSet segments CSV."""
    segments = {}
    with open(path, newline="") as f:
        for row in csv.reader(
            (line for line in f if not line.startswith("#")), skipinitialspace=True
        ):
            if len(row) >= 4:
                segments[row[0]] = row[3]
    return segments


def _label_ids(labels: str, mids: dict[str, int], where: Path) -> tuple[int, ...]:
    unknown = [m for m in labels.split(",") if m.strip() and m.strip() not in mids]
    if unknown:
        raise ValueError(f"{where}: label ids {unknown[:3]} are not in the label table")
    return tuple(sorted(mids[m.strip()] for m in labels.split(",") if m.strip()))


def _index_by_youtube_id(directory: Path, wanted: set[str]) -> dict[str, Path]:
    """Audio files of ``directory`` by YouTube id: <id>.*, Y<id>.* or <id>_<start>.*."""
    index = {}
    for path in audio_files(directory) if directory.is_dir() else []:
        stem = path.stem
        candidates = ([stem[1:12]] if stem.startswith("Y") else []) + [stem[:11]]
        for ytid in candidates:
            if ytid in wanted:
                index.setdefault(ytid, path)
                break
    return index
