"""TFDS builders for the audio datasets users already hold, and the synthetic default.

Every builder reads a local source tree (nothing is downloaded), checks each clip and
writes 16 kHz mono 16-bit FLAC into array_record files with these features:

  audio        bytes    FLAC, at most ``max_seconds`` long (longer files are cut)
  num_samples  int32
  label_ids    int32[]  indices into ``info.metadata["class_names"]``
  id           bytes    the clip's id (file name, YouTube id, ...)

Unusable files (missing, unreadable, empty, NaN, ...) are skipped with a warning and
counted per split and reason in ``info.metadata["skipped"]``. Records keep generation
order (the pipeline shuffles), so arrays written beside them line up by index: AudioSet's
balanced-sampling weights are such a sidecar (``sample_weights-<split>.npy``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import functools
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from asda_jax import audio, progress, storage
from asda_jax.data import synthetic

WEIGHTS_FILE = "sample_weights-{split}.npy"
# How clips are converted: "threads", "processes", or "auto": processes for a source of
# files of at least PROCESS_POOL_MIN_CLIPS clips with more than two workers (their
# start-up, ~5 s of imports each, is then a small share of the work; on two cores
# threads convert as fast), else threads.
POOLS = ("auto", "threads", "processes")
PROCESS_POOL_MIN_CLIPS = 2000
FEATURES = {
    "audio": tfds.features.Tensor(shape=(), dtype=np.object_),
    "num_samples": tfds.features.Tensor(shape=(), dtype=np.int32),
    "label_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
    "id": tfds.features.Tensor(shape=(), dtype=np.object_),
}


class DatasetLayoutError(FileNotFoundError):
    """A source tree that is missing, or not laid out as the builder expects."""


@dataclasses.dataclass(frozen=True)
class ClipRef:
    """One clip of a source listing, before it is read."""

    path: str
    label_ids: tuple[int, ...]
    clip_id: str
    start_seconds: float = 0.0  # where the clip starts in its file (a segment of it)


class AudioSourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared machinery: list a source's clips, convert them in parallel, skip bad ones."""

    VERSION = tfds.core.Version("1.0.0")
    LAYOUT = ""  # the expected source tree, shown when it is missing or mis-laid
    MAX_SECONDS = 30.0
    NEEDS_SOURCE = True
    NUM_CLASSES: int | None = None  # fixed by the dataset itself (None: by its source)
    DECODES_FILES = True  # False: clips are computed, cheaper than sending them back

    def __init__(
        self,
        *,
        source_dir: str | os.PathLike | None = None,
        max_seconds: float | None = None,
        workers: int | None = None,
        pool: str = "auto",
        **kwargs,
    ):
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self._source_dir = None if source_dir is None else Path(source_dir)
        self._max_seconds = max_seconds or self.MAX_SECONDS
        self._workers = workers or os.cpu_count() or 1
        self._pool = pool
        self.sample_weights: dict[str, np.ndarray] = {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=tfds.features.FeaturesDict(FEATURES),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    # -- to override ---------------------------------------------------------------

    def list_splits(self, source: Path | None) -> tuple[dict[str, list[ClipRef]], list[str]]:
        """(clips per split, class names) of the source tree."""
        raise NotImplementedError

    def clip_weights(self, splits: dict[str, list[ClipRef]]) -> dict[str, np.ndarray]:
        """Per-clip sampling weights for the splits that have them (default: none)."""
        return {}

    def clip_reader(self) -> Callable[[ClipRef], np.ndarray]:
        """How one clip becomes a mono 16 kHz waveform: a module-level function (or a
        partial of one), so that worker processes can be handed it."""
        return functools.partial(read_clip, max_seconds=self._max_seconds)

    # -- shared --------------------------------------------------------------------

    def layout_error(self, problem: str) -> DatasetLayoutError:
        return DatasetLayoutError(
            f"{self.name}: {problem}\nExpected source layout:\n{self.LAYOUT.strip()}"
        )

    def require(self, path: Path) -> Path:
        if not path.exists():
            raise self.layout_error(f"missing {path}")
        return path

    def _split_generators(self, dl_manager):
        if self.NEEDS_SOURCE:
            if self._source_dir is None:
                raise ValueError(f"{self.name}: building needs source_dir (the local source tree)")
            if not self._source_dir.is_dir():
                raise self.layout_error(f"source directory {self._source_dir} does not exist")
        splits, class_names = self.list_splits(self._source_dir)
        if not any(splits.values()):
            raise self.layout_error(f"no clips found under {self._source_dir}")
        weights = self.clip_weights(splits)
        self.info.metadata.update(class_names=list(class_names), skipped={})
        return {
            split: self._generate_examples(split, clips, weights.get(split))
            for split, clips in splits.items()
            if clips
        }

    def _generate_examples(self, split: str, clips: Sequence[ClipRef], weights):
        skipped: collections.Counter = collections.Counter()
        kept = []
        converted = progress.progress(self._converted(clips), f"{self.name}/{split}",
                                      total=len(clips), unit="clips")  # fmt: skip
        for i, (ref, result) in enumerate(converted):
            if isinstance(result, audio.AudioError):
                skipped[result.reason] += 1
                logging.warning("%s/%s: skipping %s", self.name, split, result)
                continue
            flac, num_samples = result
            kept.append(i)
            yield (
                i,
                {
                    "audio": flac,
                    "num_samples": num_samples,
                    "label_ids": np.asarray(ref.label_ids, np.int32),
                    "id": ref.clip_id,
                },
            )
        self.info.metadata["skipped"][split] = dict(skipped)
        if skipped:
            logging.warning(
                "%s/%s: skipped %s of %d clips", self.name, split, dict(skipped), len(clips)
            )
        if weights is not None:
            self.sample_weights[split] = np.asarray(weights, np.float32)[kept]

    def _uses_processes(self, clips: int) -> bool:
        if self._pool == "auto":
            many = self._workers > 2 and clips >= PROCESS_POOL_MIN_CLIPS
            return self.DECODES_FILES and many
        return self._pool == "processes"

    def _converted(self, clips: Sequence[ClipRef]) -> Iterator[tuple[ClipRef, object]]:
        """(clip, (flac bytes, samples) or AudioError) in order, a bounded window in flight.

        A large source is converted by ``workers`` processes (started with spawn: the
        parent holds JAX's and TF's threads, which fork would copy mid-state), a small
        one by threads, whose start costs nothing; decoding and FLAC encoding hold the
        GIL only between library calls, but with many cores the Python between them
        becomes the limit."""
        if self._uses_processes(len(clips)):
            context = multiprocessing.get_context("spawn")
            pool = concurrent.futures.ProcessPoolExecutor(self._workers, mp_context=context)
            convert = functools.partial(convert_clip, self.clip_reader())
        else:
            pool = concurrent.futures.ThreadPoolExecutor(self._workers)
            convert = self._convert
        with pool:
            window = 16 * self._workers
            for start in range(0, len(clips), window):
                chunk = clips[start : start + window]
                yield from zip(chunk, pool.map(convert, chunk, chunksize=4), strict=True)

    def _convert(self, ref: ClipRef):
        return convert_clip(self.clip_reader(), ref)


def read_clip(ref: ClipRef, max_seconds: float) -> np.ndarray:
    return audio.read_audio(ref.path, max_seconds=max_seconds, start_seconds=ref.start_seconds)


def convert_clip(reader: Callable[[ClipRef], np.ndarray], ref: ClipRef):
    """(FLAC bytes, samples) of one clip, or the AudioError that makes it unusable."""
    try:
        wave = reader(ref)
    except audio.AudioError as e:
        return e
    return audio.encode_flac(wave), int(wave.size)


def audio_files(directory: Path | epath.Path) -> list[Path | epath.Path]:
    """The candidate audio files under a folder (local, or remote: ``gs://``), sorted:
    every file but hidden ones (a leading dot: ``.DS_Store``, macOS's ``._`` forks).
    Whether a file is audio is decided by decoding it (libsndfile: WAV, AIFF, FLAC,
    Ogg Vorbis and Opus, MP3, ...), not by its extension; what does not decode is
    skipped and counted where it is read."""
    if storage.is_remote(directory):
        names = storage.files_under(directory)
        return [directory / n for n in names if not _hidden(Path(n))]
    local = Path(os.fspath(directory))  # epath refuses rglob, even for local folders
    found = sorted(p for p in local.rglob("*") if p.is_file() and not _hidden(p.relative_to(local)))
    return [directory / p.relative_to(local) for p in found]


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def read_lines(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


# ---------------------------------------------------------------------------- ESC-50


class Esc50(AudioSourceBuilder, skip_registration=True):
    """ESC-50: 2 000 five-second clips of 50 environmental sound classes in 5 folds.

    Splits ``fold1`` … ``fold5``; cross-validation trains on four (``fold1+fold2+…``)
    and evaluates on the fifth.
    """

    name = "esc50"
    MAX_SECONDS = 5.0
    NUM_CLASSES = 50
    LAYOUT = """
<source>/meta/esc50.csv      columns filename,fold,target,category,... (the official file)
<source>/audio/<filename>    the clips named in the CSV
"""

    def list_splits(self, source):
        self.require(source / "audio")
        with open(self.require(source / "meta" / "esc50.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"filename", "fold", "target", "category"} <= set(rows[0]):
            raise self.layout_error(
                "meta/esc50.csv lacks the columns filename,fold,target,category"
            )
        names = {int(r["target"]): r["category"] for r in rows}
        if sorted(names) != list(range(len(names))):
            raise self.layout_error(f"targets are not 0..{len(names) - 1}: {sorted(names)}")
        splits: dict[str, list[ClipRef]] = {f"fold{k}": [] for k in range(1, 6)}
        for r in rows:
            ref = ClipRef(str(source / "audio" / r["filename"]), (int(r["target"]),), r["filename"])
            splits[f"fold{int(r['fold'])}"].append(ref)
        return splits, [names[i] for i in range(len(names))]


# ---------------------------------------------------------------------------- Speech Commands


SPEECH_COMMANDS_35 = sorted(
    [
        "backward",
        "bed",
        "bird",
        "cat",
        "dog",
        "down",
        "eight",
        "five",
        "follow",
        "forward",
        "four",
        "go",
        "happy",
        "house",
        "learn",
        "left",
        "marvin",
        "nine",
        "no",
        "off",
        "on",
        "one",
        "right",
        "seven",
        "sheila",
        "six",
        "stop",
        "three",
        "tree",
        "two",
        "up",
        "visual",
        "wow",
        "yes",
        "zero",
    ]
)


class SpeechCommandsV2(AudioSourceBuilder, skip_registration=True):
    """Speech Commands V2, the 35-word task, with the official validation and test lists."""

    name = "speech_commands_v2"
    NUM_CLASSES = len(SPEECH_COMMANDS_35)
    MAX_SECONDS = 1.0
    LAYOUT = """
<source>/<word>/<clip>.wav                 one folder per word (35 words)
<source>/validation_list.txt               <word>/<clip>.wav per line
<source>/testing_list.txt                  <word>/<clip>.wav per line
"""

    def list_splits(self, source):
        validation = read_lines(self.require(source / "validation_list.txt"))
        testing = read_lines(self.require(source / "testing_list.txt"))
        present = [w for w in SPEECH_COMMANDS_35 if (source / w).is_dir()]
        if not present:
            raise self.layout_error("none of the 35 word folders is present")
        splits: dict[str, list[ClipRef]] = {"train": [], "validation": [], "test": []}
        for word in present:
            for path in sorted((source / word).glob("*.wav")):
                relative = f"{word}/{path.name}"
                split = (
                    "validation"
                    if relative in validation
                    else "test"
                    if relative in testing
                    else "train"
                )
                splits[split].append(
                    ClipRef(str(path), (SPEECH_COMMANDS_35.index(word),), relative)
                )
        return splits, SPEECH_COMMANDS_35


# ---------------------------------------------------------------------------- a labelled folder


FOLDER_SPLITS = ("train", "validation", "test")


class AudioFolder(AudioSourceBuilder, skip_registration=True):
    """A user's own labelled audio: class folders, or a CSV of paths and labels."""

    name = "audio_folder"
    LAYOUT = """
class folders:   <source>/<class>/<clip>   (any format libsndfile decodes)
                 (or <source>/{train,validation,test}/<class>/<clip>... for explicit splits)
or a CSV:        <source>/labels.csv with columns path,labels[,split]
                 (paths relative to <source>; several labels separated by ';')
"""

    def list_splits(self, source):
        if (source / "labels.csv").exists():
            return self._from_csv(source)
        split_dirs = [source / s for s in FOLDER_SPLITS if (source / s).is_dir()]
        roots = {d.name: d for d in split_dirs} or {"train": source}
        classes = sorted({c.name for root in roots.values() for c in root.iterdir() if c.is_dir()})
        if not classes:
            raise self.layout_error("no labels.csv and no class folders")
        splits = {
            split: [
                ClipRef(str(p), (classes.index(c.name),), str(p.relative_to(source)))
                for c in sorted(d for d in root.iterdir() if d.is_dir())
                for p in audio_files(c)
            ]
            for split, root in roots.items()
        }
        return splits, classes

    def _from_csv(self, source):
        with open(source / "labels.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"path", "labels"} <= set(rows[0]):
            raise self.layout_error("labels.csv needs the columns path,labels")
        labels_of = [[lab.strip() for lab in r["labels"].split(";") if lab.strip()] for r in rows]
        classes = sorted({lab for labels in labels_of for lab in labels})
        splits: dict[str, list[ClipRef]] = collections.defaultdict(list)
        for row, labels in zip(rows, labels_of, strict=True):
            ids = tuple(classes.index(lab) for lab in labels)
            splits[row.get("split") or "train"].append(
                ClipRef(str(source / row["path"]), ids, row["path"])
            )
        return dict(splits), classes


# ---------------------------------------------------------------------------- unlabelled recordings


def file_seconds(path: Path) -> float | None:
    """A file's duration from its header, or None if the header cannot be read."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError):
        return None
    return info.frames / info.samplerate if info.samplerate else None


def segment_starts(seconds: float, segment: float, shortest_tail: float) -> list[float]:
    """Starts of the consecutive segments of a recording: every whole segment, and the
    tail when it holds at least ``shortest_tail`` seconds (a recording shorter than one
    segment is one segment)."""
    whole = int(seconds // segment)
    starts = [k * segment for k in range(whole)]
    if not starts or seconds - whole * segment >= shortest_tail:
        starts.append(whole * segment)
    return starts


class UnlabelledFolder(AudioSourceBuilder, skip_registration=True):
    """A folder of the user's own recordings without labels, for pretraining.

    Every audio file under the folder (recursively) is cut into consecutive segments of
    ``max_seconds`` (default: exactly one 1024-frame pretraining input, 10.255 s); each
    segment is one record of split ``train``, read by seeking into its file, so an
    epoch visits every segment once and a long recording is never decoded whole. A
    tail shorter than ``SHORTEST_TAIL`` seconds is left out. Files whose header cannot
    be read are tried once and skipped and counted like any bad clip.
    """

    name = "unlabelled_folder"
    MAX_SECONDS = audio.RELEASE_FBANK.num_samples(1024) / audio.SAMPLE_RATE
    SHORTEST_TAIL = 1.0
    LAYOUT = """
<source>/**/<recording>   any depth, any length, any format libsndfile decodes,
                          no labels (files that do not decode: skipped, counted)
"""

    def list_splits(self, source):
        refs = []
        for path in audio_files(source):
            relative = str(path.relative_to(source))
            seconds = file_seconds(path)
            starts = (
                [0.0]
                if not seconds
                else segment_starts(seconds, self._max_seconds, self.SHORTEST_TAIL)
            )
            refs += [ClipRef(str(path), (), f"{relative}@{start:.3f}", start) for start in starts]
        return {"train": refs}, []


# ---------------------------------------------------------------------------- synthetic


class Synthetic(AudioSourceBuilder, skip_registration=True):
    """The embedded default: seeded synthetic clips of ten sound classes (no source)."""

    name = "synthetic"
    MAX_SECONDS = synthetic.CLIP_SECONDS
    NEEDS_SOURCE = False
    DECODES_FILES = False
    LAYOUT = "(none: generated)"

    def __init__(self, *, clips_per_class: int = 300, test_fraction: float = 0.2, **kwargs):
        self._clips_per_class = clips_per_class
        self._test_fraction = test_fraction
        super().__init__(**kwargs)

    def list_splits(self, source):
        test_count = round(self._clips_per_class * self._test_fraction)
        splits: dict[str, list[ClipRef]] = {"train": [], "test": []}
        for seed in range(self._clips_per_class):
            split = "test" if seed < test_count else "train"
            for c, name in enumerate(synthetic.CLASS_NAMES):
                splits[split].append(ClipRef(f"{c}/{seed}", (c,), f"{name}-{seed:05d}"))
        return splits, synthetic.CLASS_NAMES

    def clip_reader(self) -> Callable[[ClipRef], np.ndarray]:
        return synthetic_clip


def synthetic_clip(ref: ClipRef) -> np.ndarray:
    class_index, seed = map(int, ref.path.split("/"))
    return audio.check_waveform(synthetic.clip(class_index, seed))
