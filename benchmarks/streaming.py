"""Labels as audio arrives (asda_jax/streaming.py): real-time factor and latency.

    python -m benchmarks.streaming [--seconds 40] [--chunk 0.1] [--models demo,base] \
        [--windows 1,2,input] [--hops 0.5,1,2] [--windows_per_call 1]

A recording of ``--seconds`` (faint noise with two synthetic events, 16 kHz int16) is
fed to a classifier's stream in ``--chunk`` pieces, as ``arecord`` or ``ffmpeg`` would
deliver it, for each model (random weights: the work does not depend on the values;
the demo model at its 1.28 s input, the base model at its 10.24 s), window (1 s, 2 s,
the model's input; whole 0.16 s patches) and hop (0.5, 1, 2 s; none longer than the
window, which would leave audio out).

Arrival is simulated on a clock of its own, with the compute measured: chunk k
arrives when its last sample has been recorded, (k + 1) · chunk seconds in; the
tagger takes, when it is free, every chunk that has arrived (at least the next one)
in one push, and its outputs leave when the push returns. For every 10 ms of the
recording after the first window, two latencies from the moment it was recorded:

- first label: until the output of the first window that holds it (at most a hop,
  plus the compute and the chunk);
- own hop: until the output of the window that stands for it on the timeline (the
  hop around a window's centre: ``timeline.own_span``), which the events use.

The real-time factor is the compute over the audio's duration (below 1 keeps up).
A stream whose factor is above 1 falls behind, and its latencies grow with the
stream's length: those rows say so. The first call of each window shape (compiling)
is timed apart (a freshly loaded classifier, on a stream of its own); the timed stream
starts warm. A push that carries several windows scores them ``--windows_per_call`` at
a time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf

from asda_jax import audio, checkpoints, inference, streaming, timeline, windows
from asda_jax import model as model_lib
from asda_jax.testing import fixtures as fx
from benchmarks import common

SR = audio.SAMPLE_RATE
MODELS = {"demo": 128, "base": 1024}  # input frames: the demo's fine-tuning, AudioSet's
CLASSES = {"demo": 10, "base": 527}
GRID = 0.01  # seconds between the recording's moments whose latency is measured


def classifier_export(root: Path, preset: str) -> Path:
    cfg = model_lib.preset(preset)
    spec = jnp.zeros((1, MODELS[preset], cfg.num_mel_bins))
    variables = model_lib.Classifier(cfg, CLASSES[preset]).init(jax.random.key(0), spec)
    return checkpoints.export(
        root / preset, nn.meta.unbox(variables)["params"], cfg, kind="finetune",
        pooling="cls", scores="sigmoid", target_frames=MODELS[preset],
        norm=audio.NORM_STATS["audioset"],
    )  # fmt: skip


def new_stream(loaded, windowing, windows_per_call: int) -> streaming.Stream:
    names = [str(i) for i in range(loaded.input.num_classes)]
    outputs = streaming.Labels(loaded, names, windowing, windows_per_call, 0.5, -60.0)
    return streaming.Stream(outputs, windowing, loaded.input.norm)


class Run:
    """One simulated stream: per push its compute and windows; per window when its
    output left."""

    def __init__(self, stream: streaming.Stream, chunks: list[np.ndarray], chunk_seconds: float):
        self.pushes = []  # (seconds of compute, windows completed)
        self.emitted = []  # (start, end, seconds when it left)
        free, k = 0.0, 0
        while k < len(chunks):
            start = max(free, (k + 1) * chunk_seconds)
            last = k  # every chunk that has arrived by the time the tagger is free
            while last + 1 < len(chunks) and (last + 2) * chunk_seconds <= start:
                last += 1
            block = np.concatenate(chunks[k : last + 1])
            began = time.perf_counter()
            hops = [o for o in stream.push(block) if isinstance(o, timeline.WindowScores)]
            spent = time.perf_counter() - began
            free = start + spent
            self.pushes.append((spent, len(hops)))
            self.emitted.extend((h.start, h.end, free) for h in hops)
            k = last + 1

    def latencies(self, windowing: windows.Windowing) -> tuple[np.ndarray, np.ndarray]:
        """(first label, own hop) latency of every 10 ms moment after the first window."""
        hop, window = windowing.hop_samples / SR, windowing.samples / SR
        last_end = max(end for _, end, _ in self.emitted)
        moments = np.arange(window, last_end - window, GRID)
        first = np.full(moments.size, np.nan)
        own = np.full(moments.size, np.nan)
        for start, end, left in self.emitted:  # in order of output
            holds = (moments >= start) & (moments < end) & np.isnan(first)
            first[holds] = left - moments[holds]
            span = timeline.own_span(timeline.WindowScores(start, end, 0.0, None), hop, window)
            stands = (moments >= span[0]) & (moments < span[1]) & np.isnan(own)
            own[stands] = left - moments[stands]
        return first[~np.isnan(first)], own[~np.isnan(own)]


def row(preset, windowing, run: Run, windows_per_call: int, seconds: float, compile_s: float):
    first, own = run.latencies(windowing)
    rtf = sum(spent for spent, _ in run.pushes) / seconds
    scoring = [(spent, n) for spent, n in run.pushes if n]
    per_window = statistics.median(spent / n for spent, n in scoring)
    calls = sum(-(-n // windows_per_call) for _, n in scoring)

    def pair(values):
        return f"{np.median(values):.2f} / {np.percentile(values, 95):.2f}"

    behind = " (falls behind)" if rtf > 1 else ""
    return [
        preset, f"{windowing.samples / SR:.2f}", f"{windowing.hop_samples / SR:.2f}",
        f"{len(run.emitted) / calls:.1f}", f"{1000 * per_window:.0f}", f"{rtf:.2f}{behind}",
        pair(first), pair(own), f"{compile_s:.1f}",
    ]  # fmt: skip


def timed_row(export, preset, frames, hop, chunks, args) -> list | None:
    """One row: a freshly loaded classifier's first window (compiling) timed apart, then
    the simulated stream, warm."""
    if windows.hop_frames(hop) > frames:
        return None  # a hop longer than the window would leave audio out
    loaded = inference.load_classifier(export)
    windowing = windows.Windowing(frames, windows.hop_frames(hop))
    first = np.concatenate(chunks)[: windowing.samples]
    began = time.perf_counter()
    assert new_stream(loaded, windowing, args.windows_per_call).push(first)
    compile_s = time.perf_counter() - began
    run = Run(new_stream(loaded, windowing, args.windows_per_call), chunks, args.chunk)
    return row(preset, windowing, run, args.windows_per_call, args.seconds, compile_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--chunk", type=float, default=0.1)
    parser.add_argument("--models", default="demo,base")
    parser.add_argument("--windows", default="1,2,input", help="seconds, or the model's input")
    parser.add_argument("--hops", default="0.5,1,2")
    parser.add_argument("--windows_per_call", type=int, default=1)
    args = parser.parse_args()
    print(common.machine())
    print(common.versions(("jax", "jaxlib", "flax", "numpy", "soxr")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recording = fx.event_recording(
            root / "stream.wav", args.seconds, [(0, 5.0, 12.0), (3, 20.0, 28.0)]
        )
        wave, _ = sf.read(recording, dtype="int16")
        size = round(args.chunk * SR)  # the last chunk may be shorter
        chunks = [wave[i : i + size] for i in range(0, wave.size, size)]
        for preset in args.models.split(","):
            export = classifier_export(root, preset)
            target, patch = MODELS[preset], model_lib.preset(preset).patch_size
            for name in args.windows.split(","):
                window = target / 100 if name == "input" else float(name)
                if window * 100 > target:
                    continue  # longer than the model's input
                frames = windows.window_frames(window, patch, target)
                for hop in map(float, args.hops.split(",")):
                    found = timed_row(export, preset, frames, hop, chunks, args)
                    if found:
                        rows.append(found)
                        print(" | ".join(found), flush=True)
    common.print_table(
        f"Streaming labels, {args.seconds:.0f} s in {args.chunk} s chunks (random weights)",
        ["model", "window s", "hop s", "windows / call", "ms / window", "real-time factor",
         "first label s, p50 / p95", "own hop s, p50 / p95", "first call s"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
