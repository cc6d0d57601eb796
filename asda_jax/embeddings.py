"""Embeddings of audio of any length from a loaded encoder.

A recording is cut into windows of the encoder's input length (``windows.py``) and
encoded ``batch_size`` windows at a time (default: the chip's ``windows_per_call``;
``windows.padded_rows``), each window padded
to the batch's length with a padding mask, so a window gives the values it gives alone.
From the outputs:

- per window: its span in seconds and its CLS output;
- per time step (16 frames = 160 ms; ``steps`` below): the patch outputs of the step,
  their frequency patches averaged (``pooling="mean"``, D values) or side by side
  (``"concat"``, F/16·D, the patch outputs as the encoder lays them out), at the time
  of the step's centre in ms. Where windows overlap (a hop below the window) a step's
  value is the mean over the windows that hold it;
- per recording (the *utterance* or *scene* embedding): the mean of its windows' CLS
  outputs, each weighted by the real frames it holds. A recording shorter than one
  window is one window, so its embedding is that window's CLS output.

``embed_clips`` does this for a batch of clips of different lengths at any sample rate;
``asda_jax.hear`` wraps it in the HEAR API.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from asda_jax import audio, inference, windows

POOLINGS = ("mean", "concat")
BUCKET_PATCHES = 8  # a batch's length is rounded up to this many time patches


class WindowOutput(NamedTuple):
    index: int  # the window's index in its recording
    start: float  # seconds
    end: float  # seconds
    num_frames: int  # real fbank frames
    cls: np.ndarray  # (D,)
    steps: np.ndarray  # (S, F/16, D): the real time steps' patch outputs


class Embedder:
    """Windowed encoding of recordings with a loaded encoder, its input normalised as
    the encoder's training input was (``norm`` overrides that)."""

    def __init__(
        self,
        encoder: inference.LoadedEncoder,
        norm: tuple[float, float] | None = None,
        *,
        window_frames: int | None = None,
        hop_frames: int | None = None,
        batch_size: int | None = None,
    ):
        cfg = encoder.cfg
        frames = window_frames or encoder.input.target_frames
        table = cfg.max_time_patches * cfg.patch_size
        if frames % cfg.patch_size or not cfg.patch_size <= frames <= table:
            raise ValueError(
                f"window of {frames} frames: it must be a multiple of {cfg.patch_size} "
                f"frames, at most the positional table's {table}"
            )
        hop = hop_frames or frames
        if hop % cfg.patch_size:
            raise ValueError(
                f"hop of {hop} frames: it must be a multiple of {cfg.patch_size} frames "
                "(one time step), so that overlapping windows' steps line up"
            )
        self.encoder, self.norm = encoder, tuple(norm or encoder.input.norm)
        self.batch_size = batch_size or encoder.run.hardware.forms.windows_per_call
        self.windowing = windows.Windowing(frames, hop)

    @property
    def cfg(self):
        return self.encoder.cfg

    @property
    def dim(self) -> int:
        return self.cfg.embed_dim

    def step_dim(self, pooling: str) -> int:
        return self.dim * (self.cfg.freq_patches if pooling == "concat" else 1)

    def of_file(self, path, block_seconds: float = 60.0) -> Iterator[WindowOutput]:
        """The window outputs of an audio file, read ``block_seconds`` at a time."""
        return self.of_windows(
            windows.windows_of_file(path, self.windowing, self.norm, block_seconds)
        )

    def of_array(self, wave: np.ndarray) -> Iterator[WindowOutput]:
        """The window outputs of a mono 16 kHz waveform."""
        return self.of_windows(windows.windows_of_array(wave, self.windowing, self.norm))

    def of_windows(self, stream: Iterable[windows.Window]) -> Iterator[WindowOutput]:
        for batch in windows.batches(stream, self.batch_size):
            yield from self.encode_batch(batch)

    def encode_batch(
        self, batch: list[windows.Window], rows: int | None = None
    ) -> list[WindowOutput]:
        """Window outputs of up to ``batch_size`` windows, in one call of ``rows`` rows
        (default: ``windows.padded_rows``)."""
        patch = self.cfg.patch_size
        lengths = [-(-w.num_frames // patch) * patch for w in batch]  # whole patches
        bucket = BUCKET_PATCHES * patch
        frames = min(-(-max(lengths) // bucket) * bucket, self.windowing.frames)
        size = rows or windows.padded_rows(len(batch), self.batch_size)
        spec = np.zeros((size, frames, self.cfg.num_mel_bins), np.float32)
        for row, w in enumerate(batch):
            spec[row] = w.spectrogram[:frames]
        rows = np.full(size, patch, np.int32)  # padding rows: one patch
        rows[: len(batch)] = lengths
        tokens = np.asarray(self.encoder.encode(jnp.asarray(spec), jnp.asarray(rows)), np.float32)
        grid = tokens[:, 1:].reshape(size, frames // patch, self.cfg.freq_patches, -1)
        return [
            WindowOutput(  # copies: a view would keep the whole batch's tokens alive
                w.index,
                w.start,
                w.end,
                w.num_frames,
                tokens[row, 0].copy(),
                grid[row, : n // patch].copy(),
            )
            for row, (w, n) in enumerate(zip(batch, lengths, strict=False))
        ]


def pooled_steps(steps: np.ndarray, pooling: str) -> np.ndarray:  # (S, F/16, D) -> (S, D')
    if pooling == "mean":
        return steps.mean(axis=1)
    if pooling == "concat":
        return steps.reshape(steps.shape[0], steps.shape[1] * steps.shape[2])
    raise ValueError(f"frame pooling must be one of {POOLINGS}, got {pooling!r}")


def step_times_ms(first: int, count: int, cfg, opts=audio.RELEASE_FBANK) -> np.ndarray:
    """Centres (ms) of time steps ``first .. first + count − 1`` of a recording: step s
    holds fbank frames [16s, 16s + 16), from the first one's start to the last one's end."""
    steps = np.arange(first, first + count, dtype=np.float64)
    shift_ms = 1000.0 * opts.window_shift / opts.sample_rate
    size_ms = 1000.0 * opts.window_size / opts.sample_rate
    start = steps * cfg.patch_size * shift_ms
    end = start + (cfg.patch_size - 1) * shift_ms + size_ms
    return (start + end) / 2


class StepSeries:
    """Assembles windows' time steps into one series of a recording, overlapping windows
    averaged; ``add`` returns the steps no later window can reach, as they finish."""

    def __init__(self, embedder: Embedder, pooling: str):
        pooled_steps(np.zeros((0, 1, 1)), pooling)  # validates the name
        self.pooling, self.patch = pooling, embedder.cfg.patch_size
        self.steps_per_hop = embedder.windowing.hop // self.patch
        self.first = 0  # recording step index of sums[0]
        self.sums = np.zeros((0, embedder.step_dim(pooling)), np.float64)
        self.counts = np.zeros(0, np.int64)

    def add(self, out: WindowOutput) -> np.ndarray:
        start = out.index * self.steps_per_hop - self.first
        steps = pooled_steps(out.steps, self.pooling)
        end = start + steps.shape[0]
        if end > self.sums.shape[0]:
            grow = end - self.sums.shape[0]
            self.sums = np.concatenate([self.sums, np.zeros((grow, self.sums.shape[1]))])
            self.counts = np.concatenate([self.counts, np.zeros(grow, np.int64)])
        self.sums[start:end] += steps
        self.counts[start:end] += 1
        return self._release(start)

    def finish(self) -> np.ndarray:
        return self._release(self.sums.shape[0])

    def _release(self, count: int) -> np.ndarray:  # (count, D') float32
        done = (self.sums[:count] / np.maximum(self.counts[:count], 1)[:, None]).astype(np.float32)
        self.sums, self.counts = self.sums[count:], self.counts[count:]
        self.first += count
        return done


class WeightedMean:
    """The utterance embedding: windows' CLS outputs weighted by their real frames."""

    def __init__(self):
        self.total, self.weight = 0.0, 0

    def add(self, out: WindowOutput) -> None:
        self.total = self.total + out.cls.astype(np.float64) * out.num_frames
        self.weight += out.num_frames

    def value(self) -> np.ndarray:
        return (self.total / self.weight).astype(np.float32)


class RecordingEmbeddings(NamedTuple):
    utterance: np.ndarray  # (D,)
    windows: np.ndarray  # (W, D) CLS outputs
    spans: np.ndarray  # (W, 2) start, end in seconds
    steps: np.ndarray | None  # (S, D') per time step (None: they went to a sink)
    times_ms: np.ndarray  # (S,) centres of the steps


def assemble(
    embedder: Embedder,
    outputs: Iterable[WindowOutput],
    pooling: str,
    sink: Callable[[np.ndarray], None] | None = None,
) -> RecordingEmbeddings:
    """The embeddings of one recording's window outputs. Its time steps are handed to
    ``sink`` as they finish (a file writer keeps memory bounded), or kept and returned."""
    series, utterance = StepSeries(embedder, pooling), WeightedMean()
    cls, spans, kept = [], [], []
    count = 0

    def hand_over(done: np.ndarray) -> None:
        nonlocal count
        count += done.shape[0]
        (sink or kept.append)(done)

    for out in outputs:
        utterance.add(out)
        cls.append(out.cls)
        spans.append((out.start, out.end))
        hand_over(series.add(out))
    hand_over(series.finish())
    return RecordingEmbeddings(
        utterance.value(),
        np.stack(cls),
        np.asarray(spans),
        None if sink else np.concatenate(kept),
        step_times_ms(0, count, embedder.cfg),
    )


class ClipEmbeddings(NamedTuple):
    scene: np.ndarray  # (n, D)
    steps: np.ndarray  # (n, S, D') zero past each clip's own steps
    times_ms: np.ndarray  # (n, S) the same regular grid for every clip
    num_steps: np.ndarray  # (n,) each clip's real steps


def embed_clips(
    embedder: Embedder,
    clips: Sequence[np.ndarray],
    sample_rate: int = audio.SAMPLE_RATE,
    pooling: str = "mean",
) -> ClipEmbeddings:
    """Scene and timestamp embeddings of mono clips of any lengths (resampled to 16 kHz
    when ``sample_rate`` differs); windows of all clips share the device batches, and
    every clip gets the values it gets alone."""
    if sample_rate != audio.SAMPLE_RATE:
        clips = [audio.resample(np.asarray(c, np.float32), sample_rate) for c in clips]
    stream = itertools.chain.from_iterable(
        windows.windows_of_array(c, embedder.windowing, embedder.norm) for c in clips
    )
    per_clip: list[list[WindowOutput]] = []
    for out in embedder.of_windows(stream):
        if out.index == 0:
            per_clip.append([])
        per_clip[-1].append(out)
    if not per_clip:
        raise ValueError("no clips to embed")
    each = [assemble(embedder, outputs, pooling) for outputs in per_clip]
    longest = max(e.steps.shape[0] for e in each)
    steps = np.zeros((len(each), longest, embedder.step_dim(pooling)), np.float32)
    for i, e in enumerate(each):
        steps[i, : e.steps.shape[0]] = e.steps
    times = np.broadcast_to(step_times_ms(0, longest, embedder.cfg), (len(each), longest))
    return ClipEmbeddings(
        np.stack([e.utterance for e in each]),
        steps,
        times.astype(np.float32),
        np.asarray([e.steps.shape[0] for e in each]),
    )
