"""Audio front end: reading and checking waveforms, Kaldi fbank, normalisation.

The release's front end (``docs/method.md``): mono, 16 kHz, clip mean removed →
Kaldi log-mel fbank (128 bins, 25 ms Hanning windows every 10 ms, pre-emphasis 0.97,
per-frame DC removal, no dither, no energy) → zero-pad at the end or crop to a fixed
frame count → ``(x − mean) / (2·std)``.

``fbank`` is written against the array API shared by NumPy and ``jax.numpy``: the
same code runs on the host (``xp=np``) or jitted on the devices (``xp=jnp``). Where a
chip computes a step in a faster form (``preemphasis``, ``mel``, passes), the form
is a parameter with the plain one as default; the chip's ``hardware.Forms`` chooses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
import soundfile as sf
import soxr

from asda_jax import hardware, sharding, storage

SAMPLE_RATE = 16_000
LOG_FLOOR = float(np.finfo(np.float32).eps)  # log(eps) ≈ −15.94, as torchaudio
MIN_SAMPLES = 400  # one 25 ms window


class AudioError(ValueError):
    """A file or array that cannot be used as audio; ``reason`` names the kind of fault."""

    REASONS = ("missing", "unreadable", "non_finite", "too_short", "not_mono")

    def __init__(self, message: str, reason: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown audio fault {reason!r}; one of {self.REASONS}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # crosses from the worker processes that prepare datasets
        return type(self), (str(self), self.reason)


@dataclasses.dataclass(frozen=True)
class FbankOptions:
    """Kaldi fbank options; the defaults are the release's."""

    sample_rate: int = SAMPLE_RATE
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    low_freq: float = 20.0
    high_freq: float = 0.0  # ≤ 0: offset from Nyquist
    preemphasis: float = 0.97

    @property
    def window_size(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def window_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def fft_size(self) -> int:
        return 1 << (self.window_size - 1).bit_length()

    def num_frames(self, num_samples: int) -> int:
        """Frames Kaldi makes of ``num_samples`` (snip_edges): 10 s → 998."""
        if num_samples < self.window_size:
            return 0
        return 1 + (num_samples - self.window_size) // self.window_shift

    def num_samples(self, num_frames: int) -> int:
        """Samples needed for ``num_frames`` frames: 1024 → 164 080."""
        return (num_frames - 1) * self.window_shift + self.window_size


RELEASE_FBANK = FbankOptions()

# (mean, std) of the release's normalisation per dataset.
NORM_STATS = {
    "audioset": (-4.268, 4.569),
    "esc50": (-6.627, 5.359),
    "spcv2": (-6.846, 5.565),
    "fsd50k": (-7.966, 4.753),
}


# ---------------------------------------------------------------------------- reading


def read_audio(
    source: str | bytes,
    *,
    max_seconds: float | None = None,
    start_seconds: float = 0.0,
) -> np.ndarray:
    """Reads a file (path or encoded bytes) as mono float32 at 16 kHz, mean removed.

    Reads at most ``max_seconds`` from ``start_seconds`` (long files are never
    decoded whole). Raises AudioError for anything that is not usable audio.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not storage.path(source).is_file():
        raise AudioError(f"{name}: no such file", "missing")
    try:
        with _opened(source) as handle, sf.SoundFile(handle) as f:
            rate = f.samplerate
            f.seek(min(round(start_seconds * rate), f.frames))
            count = -1 if max_seconds is None else math.ceil(max_seconds * rate)
            data = f.read(frames=count, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise AudioError(f"{name}: unreadable audio ({e})", "unreadable") from e
    wave = data.mean(axis=1)  # (N, channels) -> (N,)
    if rate != SAMPLE_RATE:
        wave = resample(wave, rate)
    return check_waveform(wave, name)


def read_blocks(path: str | os.PathLike, block_seconds: float = 60.0) -> Iterator[np.ndarray]:
    """A file as consecutive mono float32 16 kHz blocks of about ``block_seconds``
    (the last one shorter), decoded and resampled as a stream: an hour-long recording
    is never held whole. Their concatenation is the whole file (mean not removed:
    the fbank removes each frame's own). Raises AudioError as ``read_audio`` does."""
    name = str(path)
    if not storage.path(path).is_file():
        raise AudioError(f"{name}: no such file", "missing")
    try:
        with _opened(path) as handle, sf.SoundFile(handle) as f:
            to_mono_16k = MonoResampler(f.samplerate)
            size = max(1, round(block_seconds * f.samplerate))
            for block in f.blocks(blocksize=size, dtype="float32", always_2d=True):
                yield _finite(to_mono_16k(block), name)
            yield _finite(to_mono_16k.flush(), name)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise AudioError(f"{name}: unreadable audio ({e})", "unreadable") from e


def log_mel_overview(path: str | os.PathLike, max_columns: int = 2000) -> np.ndarray:
    """A file's log-mel spectrogram for a picture: (columns, mel bins), each column the
    mean of about seconds × 100 / ``max_columns`` consecutive frames, read in blocks
    (``read_blocks``) so a recording of hours is never held whole. Frames across a
    block's edge are dropped: a picture does not miss 25 ms a minute."""
    frames_per_second = SAMPLE_RATE // RELEASE_FBANK.window_shift
    try:
        with _opened(path) as handle, sf.SoundFile(handle) as f:
            seconds = f.frames / f.samplerate
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
        raise AudioError(f"{path}: unreadable audio ({e})", "unreadable") from e
    pool = max(1, math.ceil(seconds * frames_per_second / max_columns))
    columns, left = [], np.zeros((0, RELEASE_FBANK.num_mel_bins), np.float32)
    for block in read_blocks(path):
        if block.size < RELEASE_FBANK.window_size:
            continue
        frames = np.concatenate([left, fbank(block)])
        whole = frames.shape[0] // pool * pool
        columns.append(frames[:whole].reshape(-1, pool, frames.shape[1]).mean(axis=1))
        left = frames[whole:]
    if left.shape[0]:
        columns.append(left.mean(axis=0, keepdims=True))
    if not columns:
        raise AudioError(f"{path}: shorter than one frame", "too_short")
    return np.concatenate(columns)


class MonoResampler:
    """Consecutive blocks of (N, channels) float samples at ``rate`` as mono float32 at
    16 kHz: channels mixed down by their mean, then soxr's streaming resampler (none at
    16 kHz), so that the blocks' outputs, joined, do not depend on where the blocks were
    cut. ``flush`` returns what the resampler still holds at the end."""

    def __init__(self, rate: int):
        self.stream = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1)

    def __call__(self, block: np.ndarray) -> np.ndarray:  # (N, channels) -> (N',)
        mono = block.mean(axis=1, dtype=np.float32)
        return mono if self.stream is None else self.stream.resample_chunk(mono, last=False)

    def flush(self) -> np.ndarray:
        if self.stream is None:
            return np.zeros(0, np.float32)
        return self.stream.resample_chunk(np.zeros(0, np.float32), last=True)


def _opened(source: str | os.PathLike | bytes):
    """What libsndfile reads ``source`` from: encoded bytes as a buffer, a local path
    as it is, a remote one (``gs://``) as a file object that reads ranges on demand."""
    if isinstance(source, bytes):
        return contextlib.nullcontext(io.BytesIO(source))
    if storage.is_remote(source):
        return storage.path(source).open("rb")
    return contextlib.nullcontext(source)


def _finite(block: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(block).all():
        raise AudioError(f"{name}: contains NaN or infinite samples", "non_finite")
    return block.astype(np.float32, copy=False)


def resample(wave: np.ndarray, rate: int) -> np.ndarray:
    import librosa

    return librosa.resample(wave, orig_sr=rate, target_sr=SAMPLE_RATE, res_type="soxr_hq").astype(
        np.float32
    )


def check_waveform(wave: np.ndarray, name: str = "<array>") -> np.ndarray:
    """Validates a mono waveform and removes its mean (the release's DC removal)."""
    wave = np.asarray(wave, np.float32)
    if wave.ndim != 1:
        raise AudioError(f"{name}: expected a mono waveform, got shape {wave.shape}", "not_mono")
    if wave.size < MIN_SAMPLES:
        raise AudioError(f"{name}: {wave.size} samples, shorter than one 25 ms frame", "too_short")
    if not np.isfinite(wave).all():
        raise AudioError(f"{name}: contains NaN or infinite samples", "non_finite")
    return wave - wave.mean()


def encode_flac(wave: np.ndarray) -> bytes:
    """16-bit mono FLAC at 16 kHz: how prepared datasets store audio."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


# ---------------------------------------------------------------------------- augmentation


def roll_and_gain(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The release's waveform augmentation: circular shift, gain ~ Beta(10, 10) + 0.5."""
    shift = int(rng.integers(0, wave.shape[-1]))
    return np.roll(wave, shift, axis=-1) * np.float32(rng.beta(10.0, 10.0) + 0.5)


# ---------------------------------------------------------------------------- fbank


@functools.cache
def mel_banks(opts: FbankOptions = RELEASE_FBANK) -> np.ndarray:
    """Kaldi's triangular mel filters, (num_mel_bins, fft_size/2 + 1) float32.

    Filters are triangles on the Kaldi mel scale 1127·ln(1 + f/700) between low_freq
    and high_freq; the Nyquist column is zero. A filter that catches no FFT bin stays
    all zero (torchaudio's behaviour; Kaldi itself refuses such settings).
    """
    nyquist = opts.sample_rate / 2
    high = opts.high_freq if opts.high_freq > 0 else nyquist + opts.high_freq

    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)

    mel_low, mel_high = mel(opts.low_freq), mel(high)
    delta = (mel_high - mel_low) / (opts.num_mel_bins + 1)
    bin_mel = mel(opts.sample_rate / opts.fft_size * np.arange(opts.fft_size // 2))  # (K,)
    left = mel_low + delta * np.arange(opts.num_mel_bins)[:, None]  # (M, 1)
    rising = (bin_mel - left) / delta
    falling = (left + 2 * delta - bin_mel) / delta
    weights = np.maximum(0.0, np.minimum(rising, falling))  # (M, K)
    return np.pad(weights, ((0, 0), (0, 1))).astype(np.float32)


def hanning(size: int) -> np.ndarray:
    """Kaldi's symmetric Hanning window; its first tap is exactly 0."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / (size - 1))).astype(np.float32)


@functools.cache
def mel_bands(opts: FbankOptions = RELEASE_FBANK, groups: int = 4):
    """``mel_banks`` as ``groups`` bands of consecutive filters, each with the FFT bins
    it covers: ((first_bin, end_bin, (end_bin − first_bin, filters) weights), ...).

    Each FFT bin feeds at most two neighbouring filters, so the dense (K, M) product is
    mostly zeros; four bands cut its work about 4× and give the same sums.
    """
    banks = mel_banks(opts)
    bands = []
    for band in np.array_split(banks, groups):
        covered = np.nonzero(band.sum(axis=0))[0]
        first, end = (int(covered[0]), int(covered[-1]) + 1) if covered.size else (0, 1)
        bands.append((first, end, np.ascontiguousarray(band[:, first:end].T)))
    return tuple(bands)


def frame_means(wave, opts: FbankOptions, num_frames: int):
    """Mean of every Kaldi frame of (..., N) waveforms → (..., F, 1).

    Sums blocks of gcd(window, shift) samples once, then adds window/gcd of them per
    frame (5 blocks of 80 for 25 ms / 10 ms, as strided slices), instead of re-reading
    every window.
    """
    size, shift = opts.window_size, opts.window_shift
    block = math.gcd(size, shift)
    step, per_frame = shift // block, size // block
    used = (num_frames - 1) * shift + size
    sums = wave[..., :used].reshape((*wave.shape[:-1], used // block, block)).sum(axis=-1)
    span = step * (num_frames - 1) + 1
    total = sum(sums[..., i : i + span : step] for i in range(per_frame))  # (..., F)
    return total[..., None] / size


def preemphasised(wave, coeff: float, length: int, *, xp: Any = np, form: str = "plain"):
    """Pre-emphasis of (..., N) waveforms cut or zero-padded to ``length`` samples:
    y[n] = x[n] − coeff·x[n − 1], y[0] = x[0] → (..., length).

    ``form="conv"`` (jitted only) computes it as a two-tap convolution, which XLA's CPU
    fusion runs in one pass where it splits the plain form's shift, first sample and
    padding into three.
    """
    kept = wave[..., :length]
    missing = length - kept.shape[-1]
    if form == "conv":
        if xp is np:
            raise ValueError("the 'conv' pre-emphasis is for jitted (jax.numpy) front ends")
        taps = jnp.asarray([-coeff, 1.0], jnp.float32).reshape(1, 1, 2)  # (out, in, width)
        flat = kept.reshape(-1, 1, kept.shape[-1])  # (clips, 1 channel, samples)
        out = jax.lax.conv_general_dilated(flat, taps, (1,), [(1, missing)])
        return out.reshape(*wave.shape[:-1], length)
    if form != "plain":
        raise ValueError(f"pre-emphasis form must be 'plain' or 'conv', got {form!r}")
    padded = xp.pad(kept, [(0, 0)] * (wave.ndim - 1) + [(0, missing)])
    return xp.concatenate([padded[..., :1], padded[..., 1:] - coeff * padded[..., :-1]], axis=-1)


def fbank(
    wave,
    opts: FbankOptions = RELEASE_FBANK,
    *,
    xp: Any = np,
    preemphasis: str = "plain",
    mel: str = "dense",
):
    """Kaldi log-mel fbank of (..., N) waveforms → (..., frames, num_mel_bins) float32.

    Kaldi frames the signal (1 + (N − window)//shift frames, snipped at the edges) and
    per frame removes the DC, applies pre-emphasis and a symmetric Hanning window, then
    takes a zero-padded FFT's power. With m the frame mean and pe the pre-emphasised
    *waveform*, the processed frame is (pe − (1 − coeff)·m)·window for every sample the
    window keeps (its first tap is 0, which hides the one sample where this differs).
    Pre-emphasis then runs once per sample instead of once per overlapping frame, and
    each frame is cut at fft_size against a window zero-padded to fft_size, so the FFT
    needs no padding of its own. Frames are cut without a gather: the waveform is laid
    out as rows of one shift each, and frame f is rows f, f+1, ... side by side.
    ``xp`` is ``numpy`` or ``jax.numpy``; ``preemphasis`` is ``preemphasised``'s form,
    ``mel`` "dense" (one product with the whole bank) or "bands" (``mel_bands``).
    """
    size, shift, fft_size = opts.window_size, opts.window_shift, opts.fft_size
    num_frames = opts.num_frames(wave.shape[-1])
    if num_frames < 1:
        raise AudioError(
            f"{wave.shape[-1]} samples: shorter than one {size}-sample window", "too_short"
        )
    wave = wave.astype(xp.float32)
    means = frame_means(wave, opts, num_frames)  # (..., F, 1)
    spans = -(-fft_size // shift)  # rows one fft_size frame reaches into
    num_rows = num_frames + spans - 1
    emphasised = preemphasised(wave, opts.preemphasis, num_rows * shift, xp=xp, form=preemphasis)
    rows = emphasised.reshape(*wave.shape[:-1], num_rows, shift)
    side_by_side = xp.stack([rows[..., i : i + num_frames, :] for i in range(spans)], axis=-2)
    frames = side_by_side.reshape(*rows.shape[:-2], num_frames, spans * shift)[..., :fft_size]
    window = np.pad(hanning(size), (0, fft_size - size))
    frames = (frames - (1.0 - opts.preemphasis) * means) * window
    rfft = scipy.fft.rfft if xp is np else xp.fft.rfft  # SciPy's: faster than NumPy's
    spectrum = rfft(frames, axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(xp.float32)  # (..., F, fft/2+1)
    return xp.log(xp.maximum(mel_energies(power, opts, mel, xp=xp), LOG_FLOOR))


def mel_energies(power, opts: FbankOptions, form: str, *, xp: Any = np):
    """(..., F, fft/2 + 1) power spectra → (..., F, M) mel energies, through the whole
    bank (``form="dense"``) or through its bands (``"bands"``): the same sums."""
    if form == "dense":
        return power @ xp.asarray(mel_banks(opts).T)
    if form != "bands":
        raise ValueError(f"mel form must be 'dense' or 'bands', got {form!r}")
    return xp.concatenate(
        [power[..., first:end] @ xp.asarray(w) for first, end, w in mel_bands(opts)], axis=-1
    )


# ---------------------------------------------------------------------------- to model input


def pad_or_crop(spec, target_frames: int, start: int = 0, *, xp: Any = np):
    """(..., F, M) → (..., target_frames, M): crop from ``start`` or zero-pad the end.

    Padding is a raw log-mel 0 before normalisation, as in the release.
    """
    spec = spec[..., start : start + target_frames, :]
    missing = target_frames - spec.shape[-2]
    if missing > 0:
        pad = [(0, 0)] * (spec.ndim - 2) + [(0, missing), (0, 0)]
        spec = xp.pad(spec, pad)
    return spec


def normalize(spec, mean: float, std: float):
    """The release's normalisation: (x − mean) / (2·std)."""
    return (spec - mean) / (2.0 * std)


def spectrogram(
    wave: np.ndarray,
    target_frames: int,
    norm: tuple[float, float],
    *,
    start_frame: int = 0,
    opts: FbankOptions = RELEASE_FBANK,
) -> tuple[np.ndarray, int]:
    """Host front end of one clip: (target_frames, M) normalised, and its real frame count."""
    spec = fbank(wave, opts, mel=hardware.HOST.forms.mel)
    real = min(spec.shape[0] - start_frame, target_frames)
    return normalize(pad_or_crop(spec, target_frames, start_frame), *norm), real


def clips_per_pass(batch: int, frames: int, frames_per_pass: int | None) -> int:
    """Clips the device front end transforms together: the largest divisor of ``batch``
    whose frames fit in ``frames_per_pass`` (None: the whole batch)."""
    if frames_per_pass is None:
        return batch
    most = max(1, frames_per_pass // max(frames, 1))
    return max(c for c in range(1, min(most, batch) + 1) if batch % c == 0)


def device_spectrogram(
    waves,
    num_samples,
    norm: tuple[float, float],
    opts: FbankOptions = RELEASE_FBANK,
    *,
    forms: hardware.Forms,
    per_pass: int | None = None,
):
    """Jittable batch front end: (B, S) waveforms of ``opts.num_samples(T)`` samples,
    (B,) real sample counts → ((B, T, M) normalised spectrograms, (B,) real frames).

    Frames past a clip's real length become raw 0 before normalisation, as on the host.
    Under a mesh each device transforms its own rows (shard_map over the batch axes;
    left to itself XLA gathers the whole batch onto every device for the FFT). A device
    transforms ``per_pass`` of its clips at a time, the passes one after the other in a
    ``lax.map`` (default: ``clips_per_pass`` of the chip's ``forms``).
    """
    run = functools.partial(
        _local_spectrogram, norm=norm, opts=opts, forms=forms, per_pass=per_pass
    )
    by_clip = sharding.split("batch", None)  # (B, S) split over the batch axes
    counts = sharding.split("batch")  # (B,)
    return sharding.per_device(run, (by_clip, counts), (by_clip, counts))(waves, num_samples)


def _local_spectrogram(waves, num_samples, norm, opts, forms, per_pass):
    """``device_spectrogram`` of one device's rows, in passes of ``per_pass`` clips."""
    batch = waves.shape[0]
    if per_pass is None:
        frames = opts.num_frames(waves.shape[-1])
        per_pass = clips_per_pass(batch, frames, forms.frames_per_pass)
    if batch % per_pass:
        raise ValueError(f"per_pass={per_pass} does not divide the {batch} clips of a device")
    passes = batch // per_pass
    if passes == 1:
        return normalised_spectrogram(waves, num_samples, norm, opts, forms)
    specs, frames = jax.lax.map(
        lambda args: normalised_spectrogram(*args, norm, opts, forms),
        (waves.reshape(passes, per_pass, -1), num_samples.reshape(passes, per_pass)),
    )  # (P, B/P, T, M), (P, B/P)
    return specs.reshape(batch, *specs.shape[2:]), frames.reshape(batch)


def normalised_spectrogram(waves, num_samples, norm, opts, forms):
    """(B, T, M) normalised spectrograms and (B,) real frame counts of (B, S) waveforms
    holding ``num_samples`` real samples each, in one pass (no mesh: a device's rows,
    or a program exported for serving)."""
    spec = fbank(waves, opts, xp=jnp, preemphasis=forms.preemphasis, mel=forms.mel)  # (B, T, M)
    target = spec.shape[-2]
    real = (num_samples - opts.window_size) // opts.window_shift + 1
    frames = jnp.clip(jnp.where(num_samples >= opts.window_size, real, 0), 0, target)
    keep = jnp.arange(target)[None, :, None] < frames[:, None, None]
    return normalize(jnp.where(keep, spec, 0.0), *norm), frames.astype(jnp.int32)
