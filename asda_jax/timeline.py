"""Sound-event timelines of recordings of any length from a loaded classifier.

A recording is cut into windows of the classifier's training length (``windows.py``);
each window is scored as a clip of that length is in training and evaluation (the
last one padded with silence, no mask). From the window scores:

- the file's scores: the max or the mean over its windows;
- events: consecutive windows whose top label is the same, with a score of at least
  ``threshold``, merged into (start, end, label, peak score). A window stands for the
  hop around its centre (the whole window when the hop equals it), so events of
  overlapping windows do not overhang by the overlap. Windows quieter than
  ``silence_db`` (RMS, dB re full scale) are silence: they end an event and start none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from asda_jax import windows

FILE_POOLINGS = ("max", "mean")


class WindowScores(NamedTuple):
    start: float  # seconds
    end: float  # seconds
    level_db: float
    scores: np.ndarray  # (C,)


def classify_windows(
    classify: Callable, stream: Iterable[windows.Window], batch_size: int
) -> Iterator[WindowScores]:
    """Scores of each window, ``batch_size`` windows per call (``windows.padded_rows``)."""
    for batch in windows.batches(stream, batch_size):
        rows = windows.padded_rows(len(batch), batch_size)
        spec = np.zeros((rows, *batch[0].spectrogram.shape), np.float32)
        for row, w in enumerate(batch):
            spec[row] = w.spectrogram
        scores = np.asarray(classify(jnp.asarray(spec)), np.float32)
        for row, w in enumerate(batch):
            yield WindowScores(w.start, w.end, w.level_db, scores[row].copy())


def file_scores(rows: Sequence[WindowScores], pooling: str) -> np.ndarray:  # (C,)
    if pooling not in FILE_POOLINGS:
        raise ValueError(f"file pooling must be one of {FILE_POOLINGS}, got {pooling!r}")
    scores = np.stack([r.scores for r in rows])
    return scores.max(axis=0) if pooling == "max" else scores.mean(axis=0)


class Event(NamedTuple):
    start: float
    end: float
    label: str
    peak: float


def own_span(row: WindowScores, hop_seconds: float, window_seconds: float):
    """The part of the recording a window stands for: the hop around its centre."""
    centre = row.start + window_seconds / 2
    return max(row.start, centre - hop_seconds / 2), min(row.end, centre + hop_seconds / 2)


def events(
    rows: Sequence[WindowScores],
    names: Sequence[str],
    windowing: windows.Windowing,
    threshold: float,
    silence_db: float,
) -> list[Event]:
    rate = windowing.opts.sample_rate
    hop, window = windowing.hop_samples / rate, windowing.samples / rate
    found: list[Event] = []
    current = None  # (start, end, label index, peak) of the open event
    for row in rows:
        top = int(np.argmax(row.scores))
        score = float(row.scores[top])
        start, end = own_span(row, hop, window)
        if row.level_db < silence_db or score < threshold:
            top = -1
        if current is not None and top == current[2]:
            current = (current[0], end, top, max(current[3], score))
            continue
        if current is not None:
            found.append(Event(current[0], current[1], names[current[2]], current[3]))
        current = (start, end, top, score) if top >= 0 else None
    if current is not None:
        found.append(Event(current[0], current[1], names[current[2]], current[3]))
    return found


def top_k(scores: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-scores)[:k]
    return [(names[i], float(scores[i])) for i in order]
