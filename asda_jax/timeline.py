"""Sound-event timelines of recordings of any length from a loaded classifier.

A recording is cut into windows (``windows.py``) of the classifier's training length,
each scored as a clip of that length is in training and evaluation (the last one
padded with silence, no mask), or of a shorter length, to label sooner, each scored on
its own frames with the padding masked (``masks_padding``). From the window scores:

- the file's scores: the max or the mean over its windows;
- events: consecutive windows whose top label is the same, with a score of at least
  ``threshold``, merged into (start, end, label, peak score). A window stands for the
  hop around its centre (the whole window when the hop equals it), so events of
  overlapping windows do not overhang by the overlap. Windows quieter than
  ``silence_db`` (RMS, dB re full scale) are silence: they end an event and start none.
  ``EventTracker`` applies the rule one window at a time, for streams.
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


def masks_padding(windowing: windows.Windowing, target_frames: int) -> bool:
    """Whether windows are scored with a padding mask: a window at the model's input
    length is scored as evaluation scores a clip (its padding is silence the model saw
    in training); a shorter one is scored on its own frames alone, the rest masked."""
    return windowing.frames < target_frames


def classify_batch(
    classify: Callable, batch: Sequence[windows.Window], rows: int, mask_padding: bool
) -> list[WindowScores]:
    """Scores of a batch of windows in one call of ``rows`` rows (padding rows after
    them). With ``mask_padding`` each row's frames past its real ones are masked."""
    spec = np.zeros((rows, *batch[0].spectrogram.shape), np.float32)
    frame_lengths = np.ones(rows, np.int32)  # padding rows: one patch
    for row, w in enumerate(batch):
        spec[row] = w.spectrogram
        frame_lengths[row] = w.num_frames
    scores = classify(jnp.asarray(spec), frame_lengths if mask_padding else None)
    scores = np.asarray(scores, np.float32)
    return [
        WindowScores(w.start, w.end, w.level_db, scores[row].copy()) for row, w in enumerate(batch)
    ]


def classify_windows(
    classify: Callable,
    stream: Iterable[windows.Window],
    batch_size: int,
    mask_padding: bool = False,
) -> Iterator[WindowScores]:
    """Scores of each window, ``batch_size`` windows per call (``windows.padded_rows``)."""
    for batch in windows.batches(stream, batch_size):
        rows = windows.padded_rows(len(batch), batch_size)
        yield from classify_batch(classify, batch, rows, mask_padding)


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


class EventStart(NamedTuple):
    start: float
    label: str
    score: float  # the opening window's


class EventTracker:
    """The events of windows' scores as the windows come (the rule in this module's
    docstring): ``add`` returns what a window closes and what it opens, ``finish``
    closes the event still open. Holds the open event only."""

    def __init__(
        self,
        names: Sequence[str],
        windowing: windows.Windowing,
        threshold: float,
        silence_db: float,
    ):
        rate = windowing.opts.sample_rate
        self.hop, self.window = windowing.hop_samples / rate, windowing.samples / rate
        self.names, self.threshold, self.silence_db = names, threshold, silence_db
        self.current = None  # (start, end, label index, peak) of the open event

    def add(self, row: WindowScores) -> tuple[Event | None, EventStart | None]:
        top = int(np.argmax(row.scores))
        score = float(row.scores[top])
        start, end = own_span(row, self.hop, self.window)
        if row.level_db < self.silence_db or score < self.threshold:
            top = -1
        if self.current is not None and top == self.current[2]:
            self.current = (self.current[0], end, top, max(self.current[3], score))
            return None, None
        closed = self.finish()
        if top < 0:
            return closed, None
        self.current = (start, end, top, score)
        return closed, EventStart(start, self.names[top], score)

    def finish(self) -> Event | None:
        if self.current is None:
            return None
        start, end, top, peak = self.current
        self.current = None
        return Event(start, end, self.names[top], peak)


def events(
    rows: Iterable[WindowScores],
    names: Sequence[str],
    windowing: windows.Windowing,
    threshold: float,
    silence_db: float,
) -> list[Event]:
    tracker = EventTracker(names, windowing, threshold, silence_db)
    closed = [tracker.add(row)[0] for row in rows] + [tracker.finish()]
    return [event for event in closed if event is not None]


def top_k(scores: np.ndarray, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    order = np.argsort(-scores)[:k]
    return [(names[i], float(scores[i])) for i in order]
