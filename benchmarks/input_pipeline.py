"""Front-end throughput for 10 s clips: host fbank, jitted fbank, librosa baseline.

    python -m benchmarks.input_pipeline [--clips 64] [--repeats 5]

Clips are 10 s at 16 kHz, stored as FLAC bytes as prepared datasets store them. All
rates are clips per second on this machine, timed in this process; "decode + fbank"
runs the two back to back on one thread, as one pipeline worker does.
"""

from __future__ import annotations

import argparse
import functools

import jax
import librosa
import numpy as np

from asda_jax import audio
from benchmarks import common

SECONDS, FRAMES, BATCH = 10.0, 1024, 16
NORM = audio.NORM_STATS["audioset"]


def make_clips(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    n = int(SECONDS * audio.SAMPLE_RATE)
    t = np.arange(n) / audio.SAMPLE_RATE
    clips = []
    for _ in range(count):
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + 0.05 * rng.standard_normal(n)
        clips.append(audio.encode_flac(wave.astype(np.float32)))
    return clips


def librosa_log_mel(wave: np.ndarray) -> np.ndarray:
    """What a user would otherwise write: librosa's mel spectrogram with Kaldi's framing."""
    mel = librosa.feature.melspectrogram(
        y=wave, sr=audio.SAMPLE_RATE, n_fft=512, hop_length=160, win_length=400,
        window="hann", center=False, n_mels=128, fmin=20.0, fmax=8000.0, power=2.0,
    )  # fmt: skip
    return np.log(np.maximum(mel, audio.LOG_FLOOR)).T


def host_fbank(wave: np.ndarray) -> np.ndarray:
    return audio.spectrogram(wave, FRAMES, NORM)[0]


def per_clip(fn, waves):
    return [fn(w) for w in waves]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {common.machine()}\nversions: {common.versions(('jax', 'numpy', 'librosa'))}")
    clips = make_clips(args.clips)
    waves = [audio.read_audio(c) for c in clips]
    jitted = jax.jit(functools.partial(audio.device_spectrogram, norm=NORM))

    def device_batches(waves):
        """Pads each batch of 16 waveforms into one array and runs the jitted front end."""
        samples = audio.RELEASE_FBANK.num_samples(FRAMES)
        out = []
        for start in range(0, len(waves), BATCH):
            chunk = waves[start : start + BATCH]
            padded = np.zeros((len(chunk), samples), np.float32)
            for i, w in enumerate(chunk):
                padded[i, : w.size] = w[:samples]
            lengths = np.array([min(w.size, samples) for w in chunk], np.int32)
            out.append(jitted(padded, lengths))
        return jax.block_until_ready(out)

    def decode_then(fn):
        return lambda: [fn(audio.read_audio(c)) for c in clips]

    timed = {
        "decode only (soundfile FLAC)": lambda: [audio.read_audio(c) for c in clips],
        "fbank: host NumPy + SciPy FFT": lambda: per_clip(host_fbank, waves),
        "fbank: jitted JAX (CPU device), batches of 16": lambda: device_batches(waves),
        "fbank: librosa.feature.melspectrogram (baseline)": lambda: per_clip(
            librosa_log_mel, waves
        ),
        "decode + fbank: host NumPy + SciPy FFT": decode_then(host_fbank),
        "decode + fbank: jitted JAX": lambda: device_batches([audio.read_audio(c) for c in clips]),
        "decode + fbank: librosa": decode_then(librosa_log_mel),
    }
    seconds = common.interleaved_medians([(fn, ()) for fn in timed.values()], repeats=args.repeats)
    rates = {name: len(clips) / s for name, s in zip(timed, seconds, strict=True)}
    baseline = rates["fbank: librosa.feature.melspectrogram (baseline)"]
    decode_baseline = rates["decode + fbank: librosa"]
    rows = []
    for name, rate in rates.items():
        base = decode_baseline if name.startswith("decode +") else baseline
        ratio = "" if name.startswith("decode only") else f"{rate / base:.2f}×"
        rows.append([name, f"{rate:.1f}", ratio])
    common.print_table(
        f"Front end, {args.clips} clips of {SECONDS:.0f} s, "
        f"median of {args.repeats} alternating runs",
        ["what", "clips/s", "vs librosa"],
        rows,
    )


if __name__ == "__main__":
    main()
