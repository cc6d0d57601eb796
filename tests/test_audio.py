"""Front end: Kaldi fbank parity, the release's mel banks, reading, cropping, normalising."""

import dataclasses

import jax
import jax.numpy as jnp
import kaldi_native_fbank as knf
import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from asda_jax import audio, hardware

SR = 16_000
CPU = hardware.CPU_FORMS


def tone(seconds=2.0):
    t = np.arange(int(SR * seconds)) / SR
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def noise(seconds=2.0, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(SR * seconds))).astype(np.float32)


def speech_like(seconds=2.0, seed=1):
    """Pulse train with a wandering pitch through three formant resonators, syllable AM."""
    rng = np.random.default_rng(seed)
    n = int(SR * seconds)
    t = np.arange(n) / SR
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    pulses = (np.diff(np.floor(np.cumsum(f0) / SR), prepend=0) > 0).astype(np.float64)
    signal = pulses + 0.01 * rng.standard_normal(n)
    for formant, bandwidth in ((700, 80), (1200, 90), (2500, 120)):
        r = np.exp(-np.pi * bandwidth / SR)
        theta = 2 * np.pi * formant / SR
        signal = scipy.signal.lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], signal)
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t))  # ~4 syllables per second
    signal = signal * envelope
    return (0.3 * signal / np.abs(signal).max()).astype(np.float32)


SIGNALS = {"tone": tone, "noise": noise, "speech_like": speech_like}


def knf_fbank(wave, opts: audio.FbankOptions) -> np.ndarray:
    o = knf.FbankOptions()
    o.frame_opts.samp_freq = opts.sample_rate
    o.frame_opts.dither = 0.0
    o.frame_opts.window_type = "hanning"
    o.frame_opts.frame_length_ms = opts.frame_length_ms
    o.frame_opts.frame_shift_ms = opts.frame_shift_ms
    o.frame_opts.preemph_coeff = opts.preemphasis
    o.frame_opts.remove_dc_offset = True
    o.frame_opts.snip_edges = True
    o.mel_opts.num_bins = opts.num_mel_bins
    o.mel_opts.low_freq = opts.low_freq
    o.mel_opts.high_freq = opts.high_freq
    o.use_energy = False
    o.use_power = True
    o.use_log_fbank = True
    computer = knf.OnlineFbank(o)
    computer.accept_waveform(opts.sample_rate, wave.tolist())
    computer.input_finished()
    return np.stack([computer.get_frame(i) for i in range(computer.num_frames_ready)])


# kaldi-native-fbank refuses the release's exact setting (128 bins at 25 ms / 16 kHz): some
# of its lowest filters catch no FFT bin and Kaldi asserts. So parity is checked (a) with the
# release's options at 80 bins, and (b) with 128 bins over 50 ms windows, where every
# filter is populated; (c) below checks the 128-bin / 25 ms bank against torchaudio's rule.
PARITY_OPTIONS = {
    "release_options_80_bins": dataclasses.replace(audio.RELEASE_FBANK, num_mel_bins=80),
    "128_bins_50ms": dataclasses.replace(audio.RELEASE_FBANK, frame_length_ms=50.0),
}


@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("setting", PARITY_OPTIONS)
def test_fbank_matches_kaldi_native_fbank(signal, setting, record_property):
    opts = PARITY_OPTIONS[setting]
    wave = SIGNALS[signal]()[:31_900]  # 140 samples past the last 25 ms frame go unused
    expected = knf_fbank(wave, opts)
    ours = audio.fbank(wave, opts, mel=hardware.HOST.forms.mel)
    forms = {"jit": {}, "jit_cpu": dict(preemphasis=CPU.preemphasis, mel=CPU.mel)}
    jitted = {
        name: np.asarray(jax.jit(lambda w, f=f: audio.fbank(w, opts, xp=jnp, **f))(wave))
        for name, f in forms.items()
    }  # the plain forms (accelerators), and the CPU's
    assert ours.shape == expected.shape == (opts.num_frames(wave.size), opts.num_mel_bins)
    for name, got in (("host", ours), *jitted.items()):
        diff = np.abs(got - expected)
        record_property(f"{name}_max_abs_diff", float(diff.max()))
        record_property(f"{name}_mean_abs_diff", float(diff.mean()))
        print(f"{signal} {setting} {name}: max {diff.max():.2e} mean {diff.mean():.2e}")
        assert diff.max() <= 1e-3


def torchaudio_mel_banks(num_bins, fft_size, sample_rate, low, high):
    """torchaudio.compliance.kaldi.get_mel_banks, transcribed (high ≤ 0 = Nyquist + high)."""
    num_fft_bins = fft_size // 2
    nyquist = 0.5 * sample_rate
    high = high if high > 0 else nyquist + high
    fft_bin_width = sample_rate / fft_size

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    mel_low, mel_high = mel(low), mel(high)
    mel_delta = (mel_high - mel_low) / (num_bins + 1)
    banks = np.zeros((num_bins, num_fft_bins + 1))
    for m in range(num_bins):
        left = mel_low + m * mel_delta
        center = left + mel_delta
        right = center + mel_delta
        for i in range(num_fft_bins):
            f_mel = mel(fft_bin_width * i)
            up = (f_mel - left) / (center - left)
            down = (right - f_mel) / (right - center)
            banks[m, i] = max(0.0, min(up, down))
    return banks


def test_release_mel_banks_follow_torchaudio_with_empty_filters():
    ours = audio.mel_banks(audio.RELEASE_FBANK)
    expected = torchaudio_mel_banks(128, 512, SR, 20.0, 0.0)
    assert ours.shape == (128, 257)
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    empty = np.nonzero(ours.sum(1) == 0)[0]
    assert empty.size > 0 and empty.max() < 10  # a few low filters catch no FFT bin
    spec = audio.fbank(noise())
    np.testing.assert_allclose(spec[:, empty], np.log(audio.LOG_FLOOR))


def test_frame_counts_are_kaldis():
    opts = audio.RELEASE_FBANK
    assert opts.num_frames(160_000) == 998  # 10 s
    assert opts.num_frames(80_000) == 498  # 5 s
    assert opts.num_frames(16_000) == 98  # 1 s
    assert opts.num_frames(399) == 0
    assert opts.num_samples(1024) == 164_080
    assert opts.num_frames(opts.num_samples(1024)) == 1024


def test_mel_bands_sum_like_the_dense_bank():
    power = np.random.default_rng(0).random((7, 257)).astype(np.float64)
    bands = audio.mel_bands(audio.RELEASE_FBANK)
    banded = np.concatenate([power[:, a:b] @ w for a, b, w in bands], axis=1)
    np.testing.assert_allclose(banded, power @ audio.mel_banks(audio.RELEASE_FBANK).T, rtol=1e-6)
    work = sum(w.size for _, _, w in bands)
    assert work < 0.3 * audio.mel_banks(audio.RELEASE_FBANK).size
    dense = audio.mel_energies(power, audio.RELEASE_FBANK, "dense")
    np.testing.assert_allclose(audio.mel_energies(power, audio.RELEASE_FBANK, "bands"), dense)


def test_the_cpu_forms_compute_the_plain_forms_numbers():
    """The host's banded mel against the dense product, and the jitted CPU front end
    (convolution pre-emphasis, banded mel) against the plain one: near-silent bins
    amplify float32 rounding in the log, as between any two FFTs (Kaldi parity: 1e-3)."""
    waves = np.stack([tone(1.0), noise(1.0), speech_like(1.0)])
    np.testing.assert_allclose(audio.fbank(waves, mel="bands"), audio.fbank(waves), atol=1e-5)
    plain = np.asarray(jax.jit(lambda w: audio.fbank(w, xp=jnp))(waves))
    cpu = jax.jit(lambda w: audio.fbank(w, xp=jnp, preemphasis="conv", mel="bands"))(waves)
    difference = np.abs(np.asarray(cpu) - plain)
    assert difference.max() <= 1e-3 and difference.mean() <= 2e-5
    with pytest.raises(ValueError, match="'conv' pre-emphasis is for jitted"):
        audio.preemphasised(waves, 0.97, 100, form="conv")
    with pytest.raises(ValueError, match="mel form must be"):
        audio.fbank(waves, mel="sparse")


def test_frame_means_are_the_means_of_kaldis_frames():
    wave = speech_like(0.5).astype(np.float64)
    opts = audio.RELEASE_FBANK
    count = opts.num_frames(wave.size)
    starts = np.arange(count) * opts.window_shift
    expected = [wave[s : s + opts.window_size].mean() for s in starts]
    np.testing.assert_allclose(audio.frame_means(wave, opts, count)[:, 0], expected, rtol=1e-12)


@pytest.mark.parametrize("length", [1_000, 1_200, 700])  # as long, padded, cut
def test_preemphasis_filters_pads_and_cuts_alike_in_every_form(length):
    waves = np.stack([noise(1_000 / SR, seed=s) for s in range(3)]).astype(np.float64)
    padded = np.zeros((3, length))
    padded[:, : min(length, 1_000)] = waves[:, :length]
    expected = padded.copy()
    expected[:, 1:] -= 0.97 * padded[:, :-1]
    np.testing.assert_allclose(audio.preemphasised(waves, 0.97, length), expected, rtol=1e-12)

    for form in ("plain", "conv"):  # accelerators' form, the CPU's two-tap convolution
        run = jax.jit(lambda w, form=form: audio.preemphasised(w, 0.97, length, xp=jnp, form=form))
        np.testing.assert_allclose(run(waves.astype(np.float32)), expected, atol=1e-6)


def test_batched_jit_equals_per_clip_host():
    waves = np.stack([tone(1.0), noise(1.0), speech_like(1.0)])
    batched = jax.jit(lambda w: audio.fbank(w, xp=jnp, preemphasis="conv", mel="bands"))(waves)
    for i, wave in enumerate(waves):
        # two float32 FFTs: near-silent bins differ like ours vs Kaldi's, within 1e-3
        np.testing.assert_allclose(batched[i], audio.fbank(wave), atol=1e-3)


def test_device_spectrogram_is_the_same_however_the_batch_is_split_into_passes():
    waves = np.stack([tone(1.0), noise(1.0), speech_like(1.0), noise(1.0, seed=3)] * 2)
    lengths = np.array([16_000, 9_000, 16_000, 400, 399, 16_000, 12_345, 16_000], np.int32)
    norm = audio.NORM_STATS["esc50"]
    run = jax.jit(audio.device_spectrogram, static_argnums=2, static_argnames=("forms", "per_pass"))
    whole, frames = run(waves, lengths, norm, forms=CPU, per_pass=8)
    np.testing.assert_array_equal(frames, [98, 54, 98, 1, 0, 98, 75, 98])
    for i in (0, 2, 5):  # full-length clips: the host front end, normalised
        np.testing.assert_allclose(
            whole[i], audio.normalize(audio.fbank(waves[i]), *norm), atol=1e-3
        )
    for per_pass in (1, 2, 4):
        spec, counts = run(waves, lengths, norm, forms=CPU, per_pass=per_pass)
        np.testing.assert_array_equal(counts, frames)
        np.testing.assert_allclose(spec, whole, atol=1e-5)  # each clip keeps its own row
    with pytest.raises(ValueError, match="does not divide"):
        run(waves, lengths, norm, forms=CPU, per_pass=3)


def test_cpu_passes_fit_the_frame_budget_and_divide_the_batch():
    budget = CPU.frames_per_pass
    assert budget == 4096 and hardware.TPU_FORMS.frames_per_pass is None
    assert audio.clips_per_pass(16, 1024, None) == 16  # accelerators: one pass
    assert audio.clips_per_pass(16, 1024, budget) == 4
    assert audio.clips_per_pass(12, 1024, budget) == 4
    assert audio.clips_per_pass(6, 1024, budget) == 3
    assert audio.clips_per_pass(7, 1024, budget) == 1  # prime batches go one clip at a time
    assert audio.clips_per_pass(64, 128, budget) == 32
    assert audio.clips_per_pass(3, 8192, budget) == 1


def test_pad_and_normalize_follow_the_release():
    spec = audio.fbank(noise(5.0))  # 498 frames
    mean, std = audio.NORM_STATS["audioset"]
    out, real = audio.spectrogram(noise(5.0), 1024, (mean, std))
    assert out.shape == (1024, 128) and real == 498
    np.testing.assert_allclose(out[:498], (spec - mean) / (2 * std), atol=1e-5)
    np.testing.assert_allclose(out[498:], 0.4671, atol=1e-4)  # raw 0 padding, normalised
    cropped, real = audio.spectrogram(noise(5.0), 100, (mean, std), start_frame=50)
    assert real == 100
    np.testing.assert_allclose(cropped, (spec[50:150] - mean) / (2 * std), atol=1e-5)


def test_roll_and_gain_is_a_circular_shift_times_a_beta_gain():
    wave = speech_like(1.0)
    out = audio.roll_and_gain(wave, np.random.default_rng(0))
    same = np.random.default_rng(0)
    shift, gain = int(same.integers(0, wave.size)), same.beta(10.0, 10.0) + 0.5
    np.testing.assert_allclose(out, np.roll(wave, shift) * np.float32(gain), rtol=1e-6)
    rng = np.random.default_rng(1)
    gains = [
        np.max(np.abs(audio.roll_and_gain(wave, rng))) / np.max(np.abs(wave)) for _ in range(500)
    ]
    assert min(gains) >= 0.5 and max(gains) <= 1.5 and abs(np.mean(gains) - 1.0) < 0.02


# ---------------------------------------------------------------------------- reading


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")]
)
def test_read_audio_resamples_mixes_and_removes_the_mean(tmp_path, fmt, subtype):
    t = np.arange(44_100) / 44_100
    left = 0.3 * np.sin(2 * np.pi * 500 * t) + 0.1
    stereo = np.stack([left, left], axis=1)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, stereo, 44_100, format=fmt, subtype=subtype)
    wave = audio.read_audio(str(path))
    assert wave.dtype == np.float32 and abs(wave.size - SR) <= 2
    assert abs(float(wave.mean())) < 1e-6
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * SR / wave.size - 500) < 3  # the tone survives resampling


def test_read_audio_reads_only_the_window_asked_for(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(SR * 60, np.float32) + np.arange(SR * 60) % 7 / 7, SR)
    wave = audio.read_audio(str(path), max_seconds=2.0, start_seconds=30.0)
    assert wave.size == 2 * SR


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "unreadable"),
        (b"this is not audio at all" * 10, "unreadable"),
        ("nan", "NaN"),
        ("short", "shorter than one"),
    ],
)
def test_bad_audio_raises_audio_error(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    if content == "nan":
        sf.write(path, np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    elif content == "short":
        sf.write(path, np.zeros(100, np.float32), SR)
    else:
        path.write_bytes(content)
    with pytest.raises(audio.AudioError, match=message):
        audio.read_audio(str(path))


def test_flac_round_trip_is_16_bit_exact():
    wave = audio.check_waveform(speech_like(1.0))
    decoded = audio.read_audio(audio.encode_flac(wave))
    np.testing.assert_allclose(decoded, wave, atol=1e-4)  # 16-bit quantisation
