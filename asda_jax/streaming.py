"""Audio as it arrives: per-hop labels (a classifier) or embeddings (an encoder), and
sound events, from chunks of any size, in bounded memory.

A ``Stream`` takes chunks with ``push`` and returns, for each window the samples so far
complete, its output; ``finish`` flushes the last, partial window and closes the open
event. A chunk is ``(n,)`` mono or ``(n, channels)``: int16 or int32 PCM (full scale
2¹⁵ and 2³¹, as soundfile reads such files) or float32/float64 in [-1, 1], at the
stream's sample rate. It goes through the offline front end's steps in the same
order: channels mixed down by their mean, the streaming resampler that reads files
(``audio.MonoResampler``), windows cut as ``windows.WindowCutter`` cuts a file's
blocks, normalised as the model's training input. So a stream's outputs are the
offline tools' (``launch/infer.py`` and ``extract.py`` with the same ``--window`` and
``--hop``) on a file of the same samples, wherever the chunks were cut.

Outputs, in order of time: ``timeline.WindowScores`` per window of a classifier,
followed by the ``timeline.Event`` it closes and the ``timeline.EventStart`` it opens
(``timeline.EventTracker``: ``infer.py --events``' rule); ``embeddings.WindowOutput``
per window of an encoder (its CLS output and its time steps).

Latency. A window is scored when its last sample arrives, so a sample is first
labelled by the first window that holds it, at most one hop after it (plus the
compute); the window that stands for it on the timeline (the hop around that
window's centre) ends up to half a window plus half a hop after it. Windows shorter
than the model's input (1–2 s; scored on their own frames, the padding masked)
shorten the second wait, shorter hops the first.

Compiled programs: every call scores ``windows_per_call`` rows (padding rows after the
windows at hand; more windows ready than that are scored in several calls), so a
stream of full windows runs one compiled program; at ``finish`` an encoder's last,
partial window may compile one more (``embeddings.Embedder`` buckets its frames).

Memory: the samples of at most one window plus the chunk being pushed, the
resampler's few milliseconds and the open event; nothing grows with the stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from asda_jax import audio, embeddings, inference, timeline, windows

PCM_FULL_SCALE = {np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class StreamError(ValueError):
    """A chunk a stream cannot take (its type, its width, its sample rate), or a push
    after ``finish``; the stream is as it was before the call."""


def float_frames(samples, channels: int) -> np.ndarray:  # -> (n, channels) float32
    """A chunk as float frames in [-1, 1], checked; raises before anything is kept."""
    chunk = np.asarray(samples)
    if chunk.dtype in PCM_FULL_SCALE:
        frames = chunk.astype(np.float32) / np.float32(PCM_FULL_SCALE[chunk.dtype])
    elif chunk.dtype in FLOAT_DTYPES:
        frames = chunk.astype(np.float32)
    else:
        raise StreamError(
            f"samples of type {chunk.dtype}: a stream takes int16 or int32 PCM, or "
            "float32 or float64 in [-1, 1]"
        )
    if frames.ndim == 1 and channels == 1:
        frames = frames[:, None]
    if frames.ndim != 2 or frames.shape[1] != channels:
        raise StreamError(
            f"a chunk of shape {chunk.shape} for a stream of {channels} channel(s): "
            f"give (samples,) for mono or (samples, {channels})"
        )
    if not np.isfinite(frames).all():
        raise audio.AudioError(
            "a chunk with NaN or infinite samples was refused (the stream is as before it)",
            "non_finite",
        )
    return frames


class Labels:
    """A classifier's outputs for a stream: window scores and the events they make."""

    def __init__(
        self,
        loaded: inference.LoadedClassifier,
        names: list[str],
        windowing: windows.Windowing,
        rows: int,
        threshold: float,
        silence_db: float,
    ):
        self.loaded, self.rows = loaded, rows  # rows: the windows scored a call
        self.mask_padding = timeline.masks_padding(windowing, loaded.input.target_frames)
        self.tracker = timeline.EventTracker(names, windowing, threshold, silence_db)

    def __call__(self, batch: list[windows.Window]) -> list:
        out = []
        for row in timeline.classify_batch(
            self.loaded.classify, batch, self.rows, self.mask_padding
        ):
            out.append(row)
            out.extend(change for change in self.tracker.add(row) if change is not None)
        return out

    def finish(self) -> list:
        closed = self.tracker.finish()
        return [] if closed is None else [closed]


class Embeddings:
    """An encoder's outputs for a stream: each window's CLS output and time steps."""

    def __init__(self, embedder: embeddings.Embedder):
        self.embedder = embedder

    @property
    def rows(self) -> int:  # the windows scored a call
        return self.embedder.batch_size

    def __call__(self, batch: list[windows.Window]) -> list:
        return self.embedder.encode_batch(batch, rows=self.rows)

    def finish(self) -> list:
        return []


class Stream:
    """Chunks in, the outputs of the windows they complete out (module docstring)."""

    def __init__(
        self,
        outputs: Labels | Embeddings,
        windowing: windows.Windowing,
        norm: tuple[float, float],
        *,
        rate: int = audio.SAMPLE_RATE,
        channels: int = 1,
    ):
        if channels < 1 or rate < 1 or outputs.rows < 1:
            raise ValueError(f"rate {rate}, channels {channels}, windows per call "
                             f"{outputs.rows}: each must be at least 1")  # fmt: skip
        self.outputs, self.rate, self.channels = outputs, rate, channels
        self.to_mono_16k = audio.MonoResampler(rate)
        self.cutter = windows.WindowCutter(windowing, norm)
        self.samples_in = 0  # at the stream's own rate, per channel
        self.finished = False

    @property
    def buffered_samples(self) -> int:
        """16 kHz samples held for windows to come: at most one window and one chunk."""
        return self.cutter.buffer.size

    def push(self, samples, rate: int | None = None) -> list:
        """The outputs of the windows this chunk completes (often none)."""
        if self.finished:
            raise StreamError("the stream has finished: start a new one")
        if rate is not None and rate != self.rate:
            raise StreamError(
                f"the sample rate changed from {self.rate} Hz to {rate} Hz mid-stream: "
                "a stream keeps one rate; finish it and start a new one"
            )
        frames = float_frames(samples, self.channels)
        self.samples_in += frames.shape[0]
        self.cutter.add(self.to_mono_16k(frames))
        return self._outputs(self.cutter.complete())

    def finish(self) -> list:
        """The outputs of the last windows (the last one partial) and the open event.
        Raises ``audio.AudioError`` for a stream shorter than one 25 ms frame."""
        if self.finished:
            return []
        self.finished = True
        self.cutter.add(self.to_mono_16k.flush())
        return self._outputs(self.cutter.remaining()) + self.outputs.finish()

    def _outputs(self, ready: Iterable[windows.Window]) -> list:
        out = []
        for batch in windows.batches(ready, self.outputs.rows):
            out.extend(self.outputs(batch))
        return out


class Source(NamedTuple):
    """What ``open_stream`` read of a checkpoint, for the caller's messages."""

    kind: str  # "classifier" or "encoder"
    names: list[str] | None
    windowing: windows.Windowing
    target_frames: int  # the model's input


def open_stream(
    checkpoint: str | os.PathLike,
    *,
    window: float | None = None,
    hop: float | None = None,
    rate: int = audio.SAMPLE_RATE,
    channels: int = 1,
    labels: str | os.PathLike | None = None,
    threshold: float = 0.5,
    silence_db: float = -60.0,
    windows_per_call: int = 1,
    step: int | None = None,
) -> tuple[Stream, Source]:
    """A stream over a workdir or an export: a classifier's labels and events, or an
    encoder's embeddings. ``window`` and ``hop`` in seconds (defaults: the model's
    input, and the window); a window is rounded to whole time patches (0.16 s), a hop
    to 10 ms frames (an encoder's hop must be whole time patches, as in ``extract.py``:
    its windows' steps line up)."""
    description = inference.describe(checkpoint)
    cfg, target = description.model, description.input.target_frames
    frames = target if window is None else windows.window_frames(window, cfg.patch_size, target)
    hop_frames = frames if hop is None else windows.hop_frames(hop)
    if description.head is None:
        embedder = embeddings.Embedder(
            inference.load_encoder(checkpoint, step),
            window_frames=frames,
            hop_frames=hop_frames,
            batch_size=windows_per_call,
        )
        windowing, names = embedder.windowing, None
        outputs = Embeddings(embedder)
    else:
        loaded = inference.load_classifier(checkpoint, step)
        names = inference.class_names(loaded.input, labels)
        windowing = windows.Windowing(frames, hop_frames)
        outputs = Labels(loaded, names, windowing, windows_per_call, threshold, silence_db)
    stream = Stream(outputs, windowing, description.input.norm, rate=rate, channels=channels)
    kind = "encoder" if description.head is None else "classifier"
    return stream, Source(kind, names, windowing, target)
