"""The input of an asda-jax model for Hugging Face transformers: Kaldi's log-mel
filterbank of 16 kHz mono waveforms, cut or zero-padded to the model's input length
and normalised as its training input was.

Written into every Hugging Face folder asda-jax exports and named by its
``preprocessor_config.json``; it needs NumPy and transformers only. Kaldi's fbank as
the release computed it: 25 ms frames every 10 ms (edges snipped), each frame's mean
removed, pre-emphasis 0.97, a symmetric Hanning window, the power of a 512-point FFT,
triangular filters on Kaldi's mel scale from 20 Hz to Nyquist, log (floored at
float32's epsilon); then zero-padded (a raw log-mel 0) or cropped to
``target_frames`` and mapped to (x − norm_mean) / (2·norm_std).
"""

import numpy as np
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.feature_extraction_utils import BatchFeature

FRAME, SHIFT, FFT = 400, 160, 512  # samples at 16 kHz: 25 ms, 10 ms
PREEMPHASIS, LOW_HZ = 0.97, 20.0


def mel_filters(num_mel_bins: int, sample_rate: int) -> np.ndarray:  # (M, FFT/2 + 1)
    """Kaldi's triangles on the mel scale 1127·ln(1 + f/700); the Nyquist bin unused."""

    def mel(hz):
        return 1127.0 * np.log(1.0 + np.asarray(hz, np.float64) / 700.0)

    low, high = mel(LOW_HZ), mel(sample_rate / 2)
    step = (high - low) / (num_mel_bins + 1)
    centre_of_bin = mel(sample_rate / FFT * np.arange(FFT // 2))
    left = low + step * np.arange(num_mel_bins)[:, None]
    up, down = (centre_of_bin - left) / step, (left + 2 * step - centre_of_bin) / step
    return np.pad(np.maximum(0.0, np.minimum(up, down)), ((0, 0), (0, 1)))


def kaldi_fbank(wave: np.ndarray, num_mel_bins: int, sample_rate: int) -> np.ndarray:
    """(frames, num_mel_bins) float32 log-mel energies of a mono waveform."""
    count = 1 + (wave.shape[0] - FRAME) // SHIFT
    if count < 1:
        raise ValueError(f"{wave.shape[0]} samples: shorter than one 25 ms frame")
    where = np.arange(FRAME)[None, :] + SHIFT * np.arange(count)[:, None]
    frames = wave.astype(np.float64)[where]
    frames -= frames.mean(axis=1, keepdims=True)
    frames = np.concatenate(
        [frames[:, :1] * (1 - PREEMPHASIS), frames[:, 1:] - PREEMPHASIS * frames[:, :-1]], axis=1
    )
    frames *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(FRAME) / (FRAME - 1))
    power = np.abs(np.fft.rfft(frames, n=FFT, axis=1)) ** 2
    energies = power @ mel_filters(num_mel_bins, sample_rate).T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).astype(np.float32)


class ASDAFeatureExtractor(SequenceFeatureExtractor):
    model_input_names = ("input_values", "attention_mask")

    def __init__(
        self,
        feature_size: int = 128,
        sampling_rate: int = 16000,
        target_frames: int = 1024,
        norm_mean: float = -4.268,
        norm_std: float = 4.569,
        padding_value: float = 0.0,
        return_attention_mask: bool = False,
        **kwargs,
    ):
        super().__init__(
            feature_size=feature_size,
            sampling_rate=sampling_rate,
            padding_value=padding_value,
            return_attention_mask=return_attention_mask,
            **kwargs,
        )
        self.target_frames, self.norm_mean, self.norm_std = target_frames, norm_mean, norm_std

    def features(self, wave) -> tuple[np.ndarray, int]:
        """(target_frames, M) normalised, and the real frames."""
        spec = kaldi_fbank(
            np.asarray(wave, np.float32).reshape(-1), self.feature_size, self.sampling_rate
        )
        real = min(spec.shape[0], self.target_frames)
        spec = np.pad(spec[: self.target_frames], ((0, self.target_frames - real), (0, 0)))
        return (spec - self.norm_mean) / (2.0 * self.norm_std), real

    def __call__(
        self,
        raw_speech,
        sampling_rate: int | None = None,
        return_tensors=None,
        return_attention_mask: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        """One waveform (a 1-D array) or a list of them, 16 kHz mono, in [-1, 1]."""
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"audio at {sampling_rate} Hz: this model takes {self.sampling_rate} Hz; "
                "resample it first"
            )
        batched = isinstance(raw_speech, list | tuple) or np.ndim(raw_speech) > 1
        waves = list(raw_speech) if batched else [raw_speech]
        specs, reals = zip(*(self.features(w) for w in waves), strict=True)
        data = {"input_values": np.stack(specs).astype(np.float32)}
        if return_attention_mask or (return_attention_mask is None and self.return_attention_mask):
            frames = np.arange(self.target_frames)[None, :]
            data["attention_mask"] = (frames < np.asarray(reals)[:, None]).astype(np.int32)
        return BatchFeature(data, tensor_type=return_tensors)
