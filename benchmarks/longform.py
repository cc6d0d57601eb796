"""Long recordings at the base model: real-time factor, memory, PyTorch, the matmul roof.

    python -m benchmarks.longform [--seconds 3600] [--windows 32] [--launch_batch 8]

A recording of ``--seconds`` (faint noise with a 30 s synthetic event; 16 kHz WAV) is
run through ``launch/extract.py`` and ``launch/infer.py`` in fresh processes, as a user
runs them, at the base model (random weights: the work does not depend on the values),
10.24 s windows with the hop equal to the window: wall time, audio seconds per wall
second (the real-time factor) and peak resident memory. Then the encoder alone on the
first ``--windows`` windows of the same recording at window batch 1, 8 and 32, JAX
(``embeddings.Embedder``: batching, padding masks, outputs to NumPy) against the
independent PyTorch re-implementation of the release's model (asda_jax/testing/torch_reference.py)
on the same spectrograms, alternated per batch size. FLOPs per window are counted
analytically (asda_jax/flop_counts.py); the roof is a float32 2048³ matmul timed in this
process, per library.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from asda_jax import audio, checkpoints, embeddings, flop_counts, inference, windows
from asda_jax import model as model_lib
from asda_jax.testing import fixtures as fx
from asda_jax.testing import memory
from asda_jax.testing import torch_reference as ref
from benchmarks import common
from benchmarks.train_step import matmul_roof

FRAMES, CLASSES = 1024, 527


def window_flops(cfg: model_lib.ModelConfig) -> float:
    """Analytic FLOPs of the encoder on one full window (patch embedding + blocks)."""
    return flop_counts.encoder_forward(cfg, 1, flop_counts.patches_of(cfg, FRAMES))


def write_exports(root: Path, cfg: model_lib.ModelConfig) -> tuple[Path, Path, Path]:
    """(encoder export, classifier export, label CSV) of a randomly initialised base."""
    spec = jnp.zeros((1, FRAMES, cfg.num_mel_bins))
    variables = model_lib.Classifier(cfg, CLASSES).init(jax.random.key(0), spec)
    params = nn.meta.unbox(variables)["params"]
    norm = list(audio.NORM_STATS["audioset"])
    encoder = checkpoints.export(
        root / "encoder", {"encoder": params["encoder"]}, cfg, kind="pretrain",
        target_frames=FRAMES, norm=norm,
    )  # fmt: skip
    classifier = checkpoints.export(
        root / "classifier", params, cfg, kind="finetune", pooling="cls", scores="sigmoid",
        target_frames=FRAMES, norm=norm,
    )  # fmt: skip
    labels = root / "labels.csv"
    labels.write_text("".join(f"{i},class {i}\n" for i in range(CLASSES)))
    return encoder, classifier, labels


def launched(script: str, *args: str) -> tuple[float, dict]:
    """(wall seconds, memory figures of asda_jax.testing.memory.run_measured) of a
    launch/ script."""
    start = time.perf_counter()
    done, figures = memory.run_measured(f"launch/{script}.py", *args)
    if done.returncode:
        raise RuntimeError(f"{script} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, figures


def encoder_rows(encoder_path: Path, recording: Path, count: int, flops: float, roofs):
    """JAX and PyTorch on the first ``count`` windows at window batch 1, 8 and 32."""
    loaded = inference.load_encoder(encoder_path)
    windowing = windows.Windowing(FRAMES, FRAMES)
    stream = windows.windows_of_file(recording, windowing, audio.NORM_STATS["audioset"])
    cut = [w for _, w in zip(range(count), stream, strict=False)]
    seconds = sum(w.end - w.start for w in cut)  # audio they hold (the hop is the window)
    specs = torch.from_numpy(np.stack([w.spectrogram for w in cut]))
    torch_model = ref.ReleaseModel().eval()
    rows = []
    for batch in (1, 8, 32):
        embedder = embeddings.Embedder(loaded, batch_size=batch)

        def run_jax(embedder=embedder):
            return list(embedder.of_windows(cut))

        def run_torch(batch=batch):
            with torch.no_grad():
                return [torch_model(specs[i : i + batch])[0] for i in range(0, count, batch)]

        jax_s, torch_s = common.interleaved_medians(
            [(run_jax, ()), (run_torch, ())], repeats=1, warmup=1
        )
        for name, wall, roof in (("JAX", jax_s, roofs[0]), ("PyTorch", torch_s, roofs[1])):
            gflops = count * flops / wall / 1e9
            rows.append(
                [name, batch, f"{wall:.1f}", f"{seconds / wall:.1f}×", f"{gflops:.0f}",
                 f"{gflops / roof:.0%}", f"{torch_s / jax_s:.2f}" if name == "JAX" else ""]
            )  # fmt: skip
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--launch_batch", type=int, default=8)
    args = parser.parse_args()
    print(common.machine())
    print(common.versions(("jax", "jaxlib", "flax", "numpy", "torch")))
    cfg = model_lib.preset("base")
    flops = window_flops(cfg)
    roofs = matmul_roof()
    print(f"encoder: {flops / 1e9:.1f} GFLOP per {FRAMES}-frame window; matmul roof "
          f"JAX {roofs[0]:.0f}, PyTorch {roofs[1]:.0f} GFLOP/s")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recording = fx.event_recording(
            root / "recording.wav", args.seconds, [(3, args.seconds / 2, args.seconds / 2 + 30)]
        )
        encoder, classifier, labels = write_exports(root, cfg)
        count = windows.Windowing(FRAMES, FRAMES).count(int(args.seconds * audio.SAMPLE_RATE))
        batch = f"--batch_size={args.launch_batch}"
        launches = []
        for script, extra in (
            ("extract", [f"--checkpoint={encoder}", f"--output={root / 'emb'}"]),
            ("infer", [f"--checkpoint={classifier}", f"--labels={labels}", "--events"]),
        ):
            wall, figures = launched(script, *extra, f"--audio={recording}", batch)
            gflops = count * flops / wall / 1e9
            launches.append(
                [script, args.launch_batch, f"{wall:.0f}", f"{args.seconds / wall:.1f}×",
                 f"{gflops:.0f}", f"{gflops / roofs[0]:.0%}", f"{figures['peak_rss_mib']:.0f}",
                 f"{figures['reading_growth_mib']:.0f}"]
            )  # fmt: skip
        common.print_table(
            f"The launchers on {args.seconds:.0f} s ({count} windows), base model",
            ["tool", "window batch", "wall s", "audio s / wall s", "GFLOP/s", "of JAX roof",
             "peak RSS MiB", "growth while reading MiB"],
            launches,
        )  # fmt: skip
        common.print_table(
            f"The encoder on the first {args.windows} windows, base model",
            ["", "window batch", "median s", "audio s / wall s", "GFLOP/s", "of own roof",
             "PyTorch / JAX time"],
            encoder_rows(encoder, recording, args.windows, flops, roofs),
        )  # fmt: skip


if __name__ == "__main__":
    main()
