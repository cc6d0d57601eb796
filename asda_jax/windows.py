"""Windows over audio of any length: the model's input length every hop, with their spans.

A recording (a file read in bounded blocks, or an array) is cut into windows of
``frames`` fbank frames whose starts are ``hop`` frames apart: window k covers samples
[k·hop·160, k·hop·160 + num_samples(frames)). A window exists if it is the first, or if
the one before it did not reach the end and it still holds one 25 ms frame; the last
one holds what is left, zero-padded (a raw log-mel 0, as in training). A recording
shorter than one window therefore gives one window of its whole length, which is what
the tools computed for such files before they cut windows.

Each window's spectrogram is the host front end's (``audio.spectrogram``) of its own
samples; since the fbank removes every frame's mean and pre-emphasises within the
frame, a window's frames equal the same frames of the whole recording's fbank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from asda_jax import audio


@dataclasses.dataclass(frozen=True)
class Windowing:
    frames: int  # fbank frames per window: the model's input length
    hop: int  # fbank frames between the starts of consecutive windows
    opts: audio.FbankOptions = audio.RELEASE_FBANK

    def __post_init__(self):
        if not 1 <= self.hop <= self.frames:
            raise ValueError(
                f"the hop must be 1..{self.frames} frames (the window), got {self.hop}: "
                "a longer hop would leave audio out"
            )

    @property
    def samples(self) -> int:
        return self.opts.num_samples(self.frames)

    @property
    def hop_samples(self) -> int:
        return self.hop * self.opts.window_shift

    def holds_window(self, index: int, total_samples: int) -> bool:
        """Whether window ``index`` exists in a recording of ``total_samples``."""
        if index == 0:
            return True
        previous_end = (index - 1) * self.hop_samples + self.samples
        return previous_end < total_samples and (
            total_samples - index * self.hop_samples >= self.opts.window_size
        )

    def count(self, total_samples: int) -> int:
        index = 0
        while self.holds_window(index + 1, total_samples):
            index += 1
        return index + 1


def hop_frames(seconds: float, opts: audio.FbankOptions = audio.RELEASE_FBANK) -> int:
    """A hop given in seconds as whole fbank frames (10 ms each), at least one."""
    return max(1, round(seconds * opts.sample_rate / opts.window_shift))


def window_frames(
    seconds: float, patch: int, limit: int, opts: audio.FbankOptions = audio.RELEASE_FBANK
) -> int:
    """A window given in seconds as whole time patches of ``patch`` frames (the encoder
    reads no part of a patch), the nearest count, from one patch to ``limit`` frames."""
    if seconds <= 0:
        raise ValueError(f"a window must be longer than 0 s, got {seconds}")
    frames = seconds * opts.sample_rate / opts.window_shift
    patches = max(1, int(frames / patch + 0.5))  # half a patch rounds up
    if patches * patch > limit:
        longest = limit * opts.window_shift / opts.sample_rate
        raise ValueError(f"a window of {seconds} s is longer than the model's input ({longest} s)")
    return patches * patch


class Window(NamedTuple):
    index: int
    start: float  # seconds from the recording's start
    end: float  # seconds: the start plus the audio it holds (less at the end)
    spectrogram: np.ndarray  # (frames, M) normalised, padded after the real frames
    num_frames: int  # real fbank frames
    level_db: float  # RMS level of its samples, dB re full scale


def level_db(wave: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    return 20.0 * np.log10(max(rms, 1e-10))


def _window(index: int, segment: np.ndarray, windowing: Windowing, norm) -> Window:
    spec, frames = audio.spectrogram(segment, windowing.frames, norm, opts=windowing.opts)
    start = index * windowing.hop_samples
    rate = windowing.opts.sample_rate
    return Window(
        index, start / rate, (start + segment.size) / rate, spec, frames, level_db(segment)
    )


class WindowCutter:
    """Cuts samples given block by block into windows as each one completes.

    ``add`` appends a block; ``complete`` yields the windows the samples so far hold
    whole; ``remaining`` yields, at the end of the recording, the ones left (the last
    one partial). Holds at most one window plus the block being added: what no later
    window reaches is dropped as the windows are yielded.
    """

    def __init__(self, windowing: Windowing, norm: tuple[float, float]):
        self.windowing, self.norm = windowing, norm
        self.buffer = np.zeros(0, np.float32)
        self.offset = 0  # recording sample index of buffer[0]
        self.index = 0  # the next window's

    @property
    def total(self) -> int:
        """Samples added so far."""
        return self.offset + self.buffer.size

    def add(self, block: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, np.asarray(block, np.float32)])

    def complete(self) -> Iterator[Window]:
        hop, size = self.windowing.hop_samples, self.windowing.samples
        while self.index * hop + size <= self.total:
            first = self.index * hop - self.offset
            yield self._next(self.buffer[first : first + size])

    def remaining(self) -> Iterator[Window]:
        yield from self.complete()
        if self.index == 0 and self.total < self.windowing.opts.window_size:
            raise audio.AudioError(
                f"{self.total} samples, shorter than one 25 ms frame", "too_short"
            )
        while self.windowing.holds_window(self.index, self.total):
            yield self._next(self.buffer[self.index * self.windowing.hop_samples - self.offset :])

    def _next(self, segment: np.ndarray) -> Window:
        """The window of ``segment`` at the current index; the cutter moves past it
        before the window is handed out, so a consumer that stops early loses nothing."""
        window = _window(self.index, segment, self.windowing, self.norm)
        self.index += 1
        drop = min(self.index * self.windowing.hop_samples - self.offset, self.buffer.size)
        self.buffer, self.offset = self.buffer[drop:], self.offset + drop
        return window


def windows_of_blocks(
    blocks: Iterable[np.ndarray], windowing: Windowing, norm: tuple[float, float]
) -> Iterator[Window]:
    """The windows of a recording given as consecutive blocks of samples; holds at most
    one window plus one block of samples at a time."""
    cutter = WindowCutter(windowing, norm)
    for block in blocks:
        cutter.add(block)
        yield from cutter.complete()
    yield from cutter.remaining()


def windows_of_file(
    path, windowing: Windowing, norm: tuple[float, float], block_seconds: float = 60.0
) -> Iterator[Window]:
    """The windows of an audio file, decoded ``block_seconds`` at a time."""
    return windows_of_blocks(audio.read_blocks(path, block_seconds), windowing, norm)


def windows_of_array(
    wave: np.ndarray, windowing: Windowing, norm: tuple[float, float]
) -> Iterator[Window]:
    """The windows of a mono 16 kHz waveform."""
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1:
        raise audio.AudioError(f"expected a mono waveform, got shape {wave.shape}", "not_mono")
    return windows_of_blocks([audio.check_waveform(wave)], windowing, norm)


def batches(windows: Iterable[Window], size: int) -> Iterator[list[Window]]:
    """Consecutive windows in lists of ``size`` (the last one shorter)."""
    batch: list[Window] = []
    for window in windows:
        batch.append(window)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def padded_rows(count: int, batch_size: int) -> int:
    """Rows of the device batch that carries ``count`` windows: a full batch, or for the
    last, shorter one the next power of two (a few compiled shapes, little padding)."""
    return min(batch_size, 1 << (count - 1).bit_length())
