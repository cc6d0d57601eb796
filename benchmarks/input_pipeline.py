"""Front-end throughput for 10 s clips (host fbank, jitted fbank, librosa baseline), and
the demo's input pipeline against the rate its pretraining step consumes clips.

    python -m benchmarks.input_pipeline [--clips 64] [--repeats 5] [--demo_batches 40]

Clips are 10 s at 16 kHz, stored as FLAC bytes as prepared datasets store them. All
rates are clips per second on this machine, timed in this process; "decode + fbank"
runs the two back to back on one thread, as one pipeline worker does. The jitted fbank
runs in the CPU's forms (``hardware.CPU_FORMS``: passes of a few clips, the
two-tap pre-emphasis, the banded mel), and once more with the whole batch of 16 in one
pass, to show what the passes buy; its "fbank" rows start
from batches already padded and on the device (as the pipeline delivers them), its
"decode + fbank" row from the FLAC bytes, padding and moving included. The demo part
reads the synthetic dataset (prepared under data/ if missing) through the whole Grain
pipeline of configs/demo.py (threads, shuffling, batching), then times the demo's
jitted pretraining step on one batch; each runs alone on the machine.

Our host fbank and the demo pipeline run with one OpenBLAS thread, as under
``launch/train.py`` (``asda_jax/launch_env.py``); librosa keeps NumPy's default, as a
user's own script would. (Rows that follow a multi-threaded OpenBLAS call run while its
threads still spin: ~25 % slower for the jitted fbank here.)
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import librosa
import numpy as np
import threadpoolctl

from asda_jax import audio, config_lib, hardware, sharding, train_lib, train_state
from asda_jax.data import datasets, pipeline
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


def as_launched(fn):
    """``fn`` with OpenBLAS held to one thread, as ``launch/train.py`` runs the project."""

    def run(*args):
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            return fn(*args)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--demo_batches", type=int, default=40)
    args = parser.parse_args()
    print(f"machine: {common.machine()}\nversions: {common.versions(('jax', 'numpy', 'librosa'))}")
    clips = make_clips(args.clips)
    waves = [audio.read_audio(c) for c in clips]
    cpu = functools.partial(audio.device_spectrogram, norm=NORM, forms=hardware.CPU_FORMS)
    jitted = jax.jit(cpu)
    one_pass = jax.jit(functools.partial(cpu, per_pass=BATCH))

    def on_device(waves):
        """Batches of 16 waveforms padded into one array each, on the device, with their
        real lengths: what the pipeline hands the jitted step under fbank_on="device"."""
        samples = audio.RELEASE_FBANK.num_samples(FRAMES)
        batches = []
        for start in range(0, len(waves), BATCH):
            chunk = waves[start : start + BATCH]
            padded = np.zeros((len(chunk), samples), np.float32)
            for i, w in enumerate(chunk):
                padded[i, : w.size] = w[:samples]
            lengths = np.array([min(w.size, samples) for w in chunk], np.int32)
            batches.append(jax.device_put((padded, lengths)))
        return batches

    def transform(batches, run=jitted):
        return jax.block_until_ready([run(*batch) for batch in batches])

    batches = on_device(waves)

    def decode_then(fn):
        return lambda: [fn(audio.read_audio(c)) for c in clips]

    timed = {
        "decode only (soundfile FLAC)": lambda: [audio.read_audio(c) for c in clips],
        "fbank: host NumPy + SciPy FFT": as_launched(lambda: per_clip(host_fbank, waves)),
        "fbank: jitted JAX (CPU device), batches of 16": lambda: transform(batches),
        "fbank: jitted JAX, the 16 in one pass (not the default)": lambda: transform(
            batches, one_pass
        ),
        "fbank: librosa.feature.melspectrogram (baseline)": lambda: per_clip(
            librosa_log_mel, waves
        ),
        "decode + fbank: host NumPy + SciPy FFT": as_launched(decode_then(host_fbank)),
        "decode + fbank: jitted JAX": lambda: transform(
            on_device([audio.read_audio(c) for c in clips])
        ),
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
    fed, eaten = as_launched(demo_rates)(args.demo_batches)
    common.print_table(
        f"Demo config (configs/demo.py): pipeline vs pretraining step, {args.demo_batches} "
        "batches of 32 clips of 1.28 s",
        ["what", "clips/s", "ratio"],
        [
            ["input pipeline (Grain, 2 threads, host fbank)", f"{fed:.1f}", f"{fed / eaten:.2f}×"],
            ["pretraining step consumes (jitted, all cores)", f"{eaten:.1f}", "1.00×"],
        ],
    )


def demo_rates(batches: int) -> tuple[float, float]:
    """(clips/s the demo's pipeline delivers, clips/s its pretraining step consumes)."""
    config = config_lib.load_file("configs/demo.py")
    datasets.prepare("synthetic", config.data.data_dir)
    task = train_lib.make_task(config_lib.read(config, hardware.HOST))
    stream = iter(pipeline.make_pipeline(task.data_cfg, train=True))
    batch = next(stream)  # threads started, first batch decoded
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    pipeline_rate = batches * task.data_cfg.batch_size / (time.perf_counter() - start)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    plan = train_state.plan_state(task, mesh, jax.random.PRNGKey(0))
    state = train_state.create_state(plan, mesh, jax.random.PRNGKey(0))
    with sharding.activate(mesh):
        step = train_state.jit_step(task, plan, mesh)
        batch = pipeline.to_global(batch, mesh)
        state, _ = step(state, batch)  # compile
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(batches):
            state, _ = step(state, batch)
        jax.block_until_ready(state)
    step_rate = batches * task.data_cfg.batch_size / (time.perf_counter() - start)
    return pipeline_rate, step_rate


if __name__ == "__main__":
    main()
