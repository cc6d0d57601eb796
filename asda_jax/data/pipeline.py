"""The sharded, deterministic, resumable input pipeline (Grain over TFDS array_record).

    records ──(per-host slice of a seeded per-epoch order)──▶ decode + augment ──▶ batch
            ──▶ global jax.Arrays on the mesh, prefetched

Each host reads only its rows of every global batch (a contiguous block per batch)
of one global order, so the hosts' shards are disjoint, cover every epoch, and
assemble into exactly the batch one process would read. Per-example randomness
(crop, roll, gain) is seeded by the example's global stream position, so a restored
iterator replays exactly and any host count sees the same data. Evaluation streams
are padded to whole batches of equal count on every host, with a ``valid`` flag, so
every clip is counted exactly once.

Batches hold either normalised spectrograms (``fbank_on="host"``) or raw waveforms
that ``audio.device_spectrogram`` turns into spectrograms inside the jitted step
(``fbank_on="device"``; on TPU VMs the host CPU is the usual bottleneck; "auto" is the
chip's choice, resolved by config_lib before a pipeline is made). Clips that cannot
be decoded are counted per reason in a ``ReadStats``.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import sys
import threading
import time
from collections.abc import Iterator

import grain
import jax
import numpy as np
from absl import logging

from asda_jax import audio, hardware, sharding, throughput
from asda_jax.data import datasets


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """What to read and how; built from a config's ``data`` block."""

    dataset: str = "synthetic"
    data_dir: str = "data"
    source: str = ""  # a local source tree: launch/train.py prepares the dataset from it
    split: str = "train"
    batch_size: int = 8  # global, over all hosts
    target_frames: int = 1024
    norm: tuple[float, float] = audio.NORM_STATS["audioset"]
    fbank_on: str = "auto"  # "host" | "device" | "auto": the chip's (hardware.Forms)
    random_crop: bool = False  # training only; evaluation always crops from the start
    roll_and_gain: bool = False  # training only
    weighted_sampling: bool = False  # AS-2M: draws ∝ per-clip weights, without replacement
    draws_per_epoch: int = 200_000
    seed: int = 0
    threads: int = 4
    prefetch: int = 8

    def validate(self, process_count: int = 1) -> InputConfig:
        """Raises ValueError naming what cannot be read as configured ("auto" resolved)."""
        if self.fbank_on not in ("host", "device"):
            raise ValueError(f"data.fbank_on must be 'host' or 'device', got {self.fbank_on!r}")
        if self.batch_size % process_count:
            raise ValueError(
                f"data.batch_size {self.batch_size} does not divide over {process_count} hosts"
            )
        if self.target_frames < 1:
            raise ValueError(f"data.target_frames must be positive, got {self.target_frames}")
        return self


class WeightedEpochs(grain.MapDataset):
    """Position → record index: each epoch draws ``draws`` distinct records ∝ weights.

    Efraimidis–Spirakis sampling (the ``draws`` smallest Exp(1)/w keys), seeded by
    (seed, epoch), so any position can be recomputed without replaying the stream.
    """

    def __init__(self, weights: np.ndarray, draws: int, seed: int):
        super().__init__([])
        if not (np.all(weights >= 0) and np.any(weights > 0)):
            raise ValueError("sampling weights must be non-negative and not all zero")
        self._weights = np.asarray(weights, np.float64)
        self._draws = min(draws, int(np.count_nonzero(weights)))
        self._seed = seed
        # The orders of the two latest epochs drawn: readers on several threads straddle
        # an epoch's end, and each order takes a pass over every weight to draw.
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize

    def _draw(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self._seed, epoch])
        with np.errstate(divide="ignore"):
            keys = rng.exponential(size=self._weights.size) / self._weights
        chosen = np.argpartition(keys, self._draws - 1)[: self._draws]
        return rng.permutation(chosen)

    def _epoch(self, epoch: int) -> np.ndarray:
        with self._lock:
            order = self._orders.get(epoch)
            if order is None:
                order = self._draw(epoch)
                latest = sorted(self._orders)[-1:]
                self._orders = {e: self._orders[e] for e in latest} | {epoch: order}
            return order

    def __getitem__(self, position):
        if isinstance(position, slice):
            return self.slice(position)
        epoch, offset = divmod(position, self._draws)
        return int(self._epoch(epoch)[offset])


class HostRows(grain.MapDataset):
    """One host's rows of every global batch: positions [h·b, (h+1)·b) of each block of B.

    Concatenating the hosts' rows in process order (as ``to_global`` does) rebuilds
    the global batch exactly as a single process would read it.
    """

    def __init__(self, parent: grain.MapDataset, host: int, hosts: int, host_batch: int):
        super().__init__(parent)
        self._stream, self._host, self._hosts, self._rows = parent, host, hosts, host_batch

    def __len__(self) -> int:
        total = len(self._stream)
        return total if total == sys.maxsize else total // self._hosts

    def __getitem__(self, position):
        if isinstance(position, slice):
            return self.slice(position)
        step, row = divmod(position, self._rows)
        return self._stream[(step * self._hosts + self._host) * self._rows + row]


class ReadStats:
    """Thread-safe counts of examples that could not be used, by reason."""

    def __init__(self):
        self._lock = threading.Lock()
        self._skipped: collections.Counter = collections.Counter()

    def count(self, reason: str) -> None:
        with self._lock:
            self._skipped[reason] += 1

    @property
    def skipped(self) -> dict[str, int]:
        """Examples skipped so far, by reason (``audio.AudioError.REASONS``)."""
        with self._lock:
            return dict(self._skipped)


def multi_hot(label_ids: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.zeros(num_classes, np.float32)
    labels[np.asarray(label_ids, np.int64)] = 1.0
    return labels


def crop_start(total_frames: int, target_frames: int, rng: np.random.Generator | None) -> int:
    """First frame of the crop: random in training when asked, else the start."""
    if rng is None or total_frames <= target_frames:
        return 0
    return int(rng.integers(0, total_frames - target_frames + 1))


def example_features(
    wave: np.ndarray, label_ids, index: int, num_classes: int, cfg: InputConfig, rng
) -> dict[str, np.ndarray]:
    """Model-ready features of record ``index``; ``rng`` is None for evaluation."""
    if rng is not None and cfg.roll_and_gain:
        wave = audio.roll_and_gain(wave, rng)
    opts = audio.RELEASE_FBANK
    start = crop_start(
        opts.num_frames(wave.size), cfg.target_frames, rng if cfg.random_crop else None
    )
    features = {
        "labels": multi_hot(label_ids, num_classes),
        "valid": np.bool_(True),
        "index": np.int32(index),
    }
    if cfg.fbank_on == "host":
        spec, frames = audio.spectrogram(wave, cfg.target_frames, cfg.norm, start_frame=start)
        return {**features, "spectrogram": spec, "frames": np.int32(frames)}
    segment = wave[start * opts.window_shift :][: opts.num_samples(cfg.target_frames)]
    padded = np.zeros(opts.num_samples(cfg.target_frames), np.float32)
    padded[: segment.size] = segment
    return {**features, "waveform": padded, "num_samples": np.int32(segment.size)}


def empty_features(num_classes: int, cfg: InputConfig) -> dict[str, np.ndarray]:
    """An invalid (padding) example with the shapes of a real one."""
    features = {
        "labels": np.zeros(num_classes, np.float32),
        "valid": np.bool_(False),
        "index": np.int32(-1),
    }
    if cfg.fbank_on == "host":
        spec = np.zeros((cfg.target_frames, audio.RELEASE_FBANK.num_mel_bins), np.float32)
        return {**features, "spectrogram": spec, "frames": np.int32(0)}
    samples = audio.RELEASE_FBANK.num_samples(cfg.target_frames)
    return {**features, "waveform": np.zeros(samples, np.float32), "num_samples": np.int32(0)}


def make_pipeline(
    cfg: InputConfig,
    *,
    train: bool,
    process_index: int | None = None,
    process_count: int | None = None,
    stats: ReadStats | None = None,
) -> grain.IterDataset:
    """This host's stream of batches (dicts of NumPy arrays, ``batch_size/hosts`` rows).

    Training: an endless seeded stream, bad clips skipped. Evaluation: one pass over
    the split in order, padded with invalid examples to whole, equal batches per host.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    cfg.validate(process_count)
    dataset = datasets.load(cfg.dataset, cfg.data_dir)
    source = dataset.source(cfg.split)
    num_classes, stats = dataset.num_classes, stats or ReadStats()
    host_batch = cfg.batch_size // process_count

    if train:
        order = _training_order(cfg, dataset, len(source))
    else:
        padded = -(-len(source) // cfg.batch_size) * cfg.batch_size
        order = grain.MapDataset.range(padded)

    def load(index, rng=None):
        index = int(index)
        if not train and index >= len(source):
            return empty_features(num_classes, cfg)
        record = source[index]
        try:
            wave = audio.read_audio(record["audio"])
        except audio.AudioError as e:
            stats.count(e.reason)
            logging.warning("%s[%d] (%s): %s", cfg.split, index, record["id"], e)
            return None if train else empty_features(num_classes, cfg)
        return example_features(wave, record["label_ids"], index, num_classes, cfg, rng)

    # Randomness is keyed by the global stream position, before the per-host split.
    examples = order.random_map(load, seed=cfg.seed) if train else order.map(load)
    examples = HostRows(examples, process_index, process_count, host_batch)
    options = grain.ReadOptions(num_threads=cfg.threads, prefetch_buffer_size=cfg.prefetch)
    stream = examples.to_iter_dataset(options)
    if train:
        stream = stream.filter(lambda x: x is not None)
    return stream.batch(host_batch, drop_remainder=train)


def _training_order(cfg: InputConfig, dataset: datasets.PreparedDataset, size: int):
    if cfg.weighted_sampling:
        weights = dataset.sample_weights(cfg.split)
        if weights is None:
            raise ValueError(
                f"data.weighted_sampling needs sample weights; {cfg.dataset}:{cfg.split} has none"
            )
        return WeightedEpochs(weights, cfg.draws_per_epoch, cfg.seed)
    return grain.MapDataset.range(size).seed(cfg.seed).shuffle().repeat(None)


# ---------------------------------------------------------------------------- to devices


def spectrograms(
    batch: dict, cfg: InputConfig, forms: hardware.Forms
) -> tuple[jax.Array, jax.Array]:
    """(B, T, F) normalised spectrograms and (B,) real frame counts of a batch, whichever
    side computes the fbank (on the devices: in the ``forms`` of their chip)."""
    if "spectrogram" in batch:
        return batch["spectrogram"], batch["frames"]
    return audio.device_spectrogram(batch["waveform"], batch["num_samples"], cfg.norm, forms=forms)


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assembles this host's rows into global arrays split over the data axes."""
    data_sharding = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(data_sharding, v) for k, v in batch.items()}


class DevicePrefetch(Iterator):
    """Moves ``size`` batches onto the mesh ahead of use, in a background thread.

    ``get_state()`` is the input iterator's state after the last batch handed out,
    not after the last one prefetched, so a checkpoint resumes at the right batch.
    ``production()`` is what this host's pipeline has made and the time it took
    (waiting for room in the queue left out).
    """

    def __init__(self, iterator, mesh: jax.sharding.Mesh, size: int = 2):
        self._iterator, self._mesh = iterator, mesh
        self._state = iterator.get_state()
        self._made = throughput.Production()
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while True:
                start = time.perf_counter()
                batch = next(self._iterator, None)
                if batch is None:
                    break
                item = (to_global(batch, self._mesh), self._iterator.get_state())
                clips = len(next(iter(batch.values())))
                made = self._made
                self._made = throughput.Production(
                    made.clips + clips, made.seconds + time.perf_counter() - start
                )
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(StopIteration())
        except Exception as e:  # handed to the consumer, raised there
            self._queue.put(e)

    def __next__(self) -> dict[str, jax.Array]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        batch, self._state = item
        return batch

    def get_state(self):
        return self._state

    def production(self) -> throughput.Production:
        return self._made

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
