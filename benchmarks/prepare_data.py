"""Dataset preparation throughput per core for 10 s FLAC clips, and the input side of
training per core against what one v5e-8 host must feed.

    python -m benchmarks.prepare_data [--clips 256] [--rounds 2]

A source folder of --clips 10 s clips at 44.1 kHz (FLAC, in class folders: the
``audio_folder`` layout; each is read, resampled to 16 kHz and re-encoded, as AudioSet's
are) is prepared into a fresh folder with 1 and 2 workers, as threads and as
processes, in alternating rounds, and so is a source of a quarter as many clips. A
preparation has fixed costs (TFDS's set-up, and for processes their start: a few
seconds of imports each); the marginal rate, the extra clips over the extra time between
the two sizes, is what a source of millions of clips sees. The table gives medians,
the marginal clips/s per worker and its ratio to one thread's. Then, on one thread,
the training side's work per clip (decode the prepared FLAC + host fbank, with
``launch/train.py``'s one OpenBLAS thread),
against the clips/s per chip of the v5e-8 pretraining step's roofline estimate
(BENCHMARKS.md: 98.8 clips/s per chip from ``launch/compile.py``) × 8 chips.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import threadpoolctl

from asda_jax import audio
from asda_jax.data import datasets
from benchmarks import common

SECONDS, SOURCE_RATE = 10.0, 44_100
V5E8_CLIPS_PER_S = 98.8 * 8  # the compiled roofline estimate, not a measurement
AS2M_CLIPS, HOST_CORES = 2_000_000, 96
SETTINGS = (("threads", 1), ("threads", 2), ("processes", 1), ("processes", 2))


def write_source(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(int(SECONDS * SOURCE_RATE)) / SOURCE_RATE
    for i in range(count):
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t)
        wave += 0.05 * rng.standard_normal(t.size)
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(folder / f"clip{i:05d}.flac", wave.astype(np.float32), SOURCE_RATE)


def prepare_seconds(source: Path, pool: str, workers: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        datasets.prepare("audio_folder", out, source_dir=source, workers=workers, pool=pool)
        return time.perf_counter() - start


def training_side_rate(data_dir: str, count: int) -> float:
    """Clips/s of one thread decoding prepared clips and computing their host fbank."""
    records = datasets.load("audio_folder", data_dir).source("train")
    clips = [records[i]["audio"] for i in range(min(count, len(records)))]
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        start = time.perf_counter()
        for clip in clips:
            audio.spectrogram(audio.read_audio(clip), 1024, audio.NORM_STATS["audioset"])
        return len(clips) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clips", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        sizes = {"full": args.clips, "quarter": args.clips // 4}
        for name, count in sizes.items():
            write_source(Path(scratch) / name, count)
        prepare_seconds(Path(scratch) / "quarter", "threads", 1)  # warm-up: first-use costs
        times = {(size, *s): [] for size in sizes for s in SETTINGS}
        for _ in range(args.rounds):
            for pool, workers in SETTINGS:
                for size in sizes:
                    seconds = prepare_seconds(Path(scratch) / size, pool, workers)
                    times[(size, pool, workers)].append(seconds)
        source = Path(scratch) / "full"
        datasets.prepare("audio_folder", f"{scratch}/data", source_dir=source, workers=2)
        feed = training_side_rate(f"{scratch}/data", 64)
    print(common.machine())
    print(f"{args.clips} clips of {SECONDS:g} s at {SOURCE_RATE} Hz FLAC; {args.rounds} rounds")

    def median(*key) -> float:
        return statistics.median(times[key])

    def marginal(pool: str, workers: int) -> float:
        extra = sizes["full"] - sizes["quarter"]
        return extra / (median("full", pool, workers) - median("quarter", pool, workers))

    one = marginal("threads", 1)
    rows = []
    for pool, workers in SETTINGS:
        whole = args.clips / median("full", pool, workers)
        rate = marginal(pool, workers)
        fixed = median("full", pool, workers) - args.clips / rate
        rows.append(
            (pool, workers, f"{whole:.1f}", f"{fixed:.1f}", f"{rate:.1f}",
             f"{rate / workers:.1f}", f"{rate / one:.2f}")
        )  # fmt: skip
    common.print_table(
        "Preparing 10 s FLAC clips (decode, resample to 16 kHz, FLAC, array_record)",
        ("pool", "workers", f"clips/s, {args.clips} clips", "fixed s", "marginal clips/s",
         "marginal per worker", "× one thread"),
        rows,
    )  # fmt: skip
    per_core = marginal("processes", 2) / 2
    hours = AS2M_CLIPS / (per_core * HOST_CORES) / 3600
    print(
        f"\nAS-2M ({AS2M_CLIPS:,} clips) on a {HOST_CORES}-core host at {per_core:.1f} "
        f"clips/s per core (2 processes here): {hours:.1f} h, if it scales linearly"
    )
    print(
        f"training side, one thread: {feed:.1f} clips/s (decode + host fbank); a v5e-8 host "
        f"must feed {V5E8_CLIPS_PER_S:.0f} clips/s (roofline estimate): "
        f"{V5E8_CLIPS_PER_S / feed:.1f} cores"
    )


if __name__ == "__main__":
    main()
