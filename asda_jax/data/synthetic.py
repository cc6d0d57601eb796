"""The embedded default dataset: seeded synthetic clips in ten distinct sound classes.

Each class is a family of sounds with random parameters (pitch, rate, sweep, level),
mixed with background noise at a random SNR and faded in and out, so a model has to
learn the family rather than memorise a waveform. Everything is a pure function of
(class, seed): the dataset is the same on every machine.
"""

from __future__ import annotations

import numpy as np

from asda_jax.audio import SAMPLE_RATE

CLIP_SECONDS = 1.3  # 20 800 samples → 128 fbank frames


def _tone(rng, t):
    return np.sin(2 * np.pi * rng.uniform(200, 2000) * t)


def _chirp(rng, t, up: bool):
    low, high = rng.uniform(150, 500), rng.uniform(2000, 5000)
    f0, f1 = (low, high) if up else (high, low)
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))
    return np.sin(phase)


def _noise_bursts(rng, t):
    rate = rng.uniform(3, 8)
    gate = (np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float64)
    return gate * rng.standard_normal(t.size)


def _rumble(rng, t):
    brown = np.cumsum(rng.standard_normal(t.size))
    brown -= np.convolve(brown, np.ones(400) / 400, mode="same")  # remove the drift
    return brown / (np.abs(brown).max() + 1e-9)


def _hiss(rng, t):
    white = rng.standard_normal(t.size)
    return np.diff(white, prepend=0.0)  # first difference: high-pass


def _harmonic(rng, t):
    f0 = rng.uniform(100, 300)
    return sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 9))


def _clicks(rng, t):
    period = int(SAMPLE_RATE / rng.uniform(5, 20))
    out = np.zeros(t.size)
    out[rng.integers(0, period) :: period] = 1.0
    return np.convolve(out, np.hanning(16), mode="same")


def _am_tone(rng, t):
    carrier = np.sin(2 * np.pi * rng.uniform(300, 1500) * t)
    return carrier * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 10) * t))


def _vibrato(rng, t):
    fc, depth, rate = rng.uniform(400, 1500), rng.uniform(50, 200), rng.uniform(4, 8)
    return np.sin(2 * np.pi * fc * t + depth / rate * np.sin(2 * np.pi * rate * t))


CLASSES = {
    "tone": _tone,
    "chirp_up": lambda rng, t: _chirp(rng, t, up=True),
    "chirp_down": lambda rng, t: _chirp(rng, t, up=False),
    "noise_bursts": _noise_bursts,
    "rumble": _rumble,
    "hiss": _hiss,
    "harmonic": _harmonic,
    "clicks": _clicks,
    "am_tone": _am_tone,
    "vibrato": _vibrato,
}
CLASS_NAMES = list(CLASSES)


def clip(class_index: int, seed: int, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """One float32 clip of ``CLASS_NAMES[class_index]``, peak ≤ 0.9, deterministic in seed."""
    rng = np.random.default_rng([class_index, seed])
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    sound = CLASSES[CLASS_NAMES[class_index]](rng, t)
    sound = sound / (np.abs(sound).max() + 1e-9)
    fade = min(t.size // 4, int(rng.uniform(0.01, 0.2) * SAMPLE_RATE))
    envelope = np.ones(t.size)
    envelope[:fade] = np.linspace(0, 1, fade)
    envelope[t.size - fade :] = np.linspace(1, 0, fade)
    snr_db = rng.uniform(10, 30)
    background = rng.standard_normal(t.size) * 10 ** (-snr_db / 20) / 3
    mixed = (sound * envelope + background) * rng.uniform(0.2, 1.0)
    return (0.9 * mixed / max(1.0, np.abs(mixed).max())).astype(np.float32)
