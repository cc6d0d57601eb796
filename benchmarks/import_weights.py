"""Importing Hugging Face (EAT-layout) weights: time and peak memory for EAT base and
large, and the imported EAT base's features per second against the release-form ASDA
base, at 10.24 s (1024 frames), in one process.

    python -m benchmarks.import_weights [--rounds 3] [--sizes base,large]

Each size's folder (config.json + model.safetensors of random float32 weights, as
EAT's uploads are laid out) is written once to a temporary folder. Each round imports
it in a fresh process (``hf_weights.import_model``, then ``checkpoints.export`` to
Orbax, as ``launch/convert_torch.py`` does): the table gives the medians of the
import alone, of the export, and the process's peak resident memory (``ru_maxrss``)
against the file's size. The speed table times both encoders (jitted, batch 4, this
host's CPU, float32) in alternating rounds (``common.interleaved_medians``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asda_jax import checkpoints, hf_weights, release_weights
from asda_jax import model as model_lib
from benchmarks import common

SIZES = {"base": "eat_base", "large": "eat_large"}
FRAMES = 1024


def write_folder(folder: Path, preset: str) -> int:
    """An EAT-layout folder of random weights for ``preset``; the file's bytes."""
    cfg = model_lib.preset(preset)
    fields = hf_weights.config_fields(cfg, "pretrained", hf_weights.AUDIOSET_CLASSES, FRAMES)
    hub = hf_weights.read_config(fields)
    rng = np.random.default_rng(0)
    tensors = {
        t.theirs: rng.standard_normal(t.torch_shape, dtype=np.float32) * 0.02
        for t in hf_weights.layout(hub)
    }
    tensors[release_weights.HUGGING_FACE.positions] = release_weights.positions_table(cfg)
    folder.mkdir(parents=True)
    hf_weights.write_tensors(folder / hf_weights.WEIGHTS_FILE, tensors)
    (folder / hf_weights.CONFIG_FILE).write_text(json.dumps(fields))
    return (folder / hf_weights.WEIGHTS_FILE).stat().st_size


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the parent's
    peak over fork and exec)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def import_once(folder: str, output: str) -> dict:
    """One import and export in this process (run in a fresh one per round)."""
    before_mib = peak_rss_mib()  # the libraries
    start = time.perf_counter()
    imported = hf_weights.import_model(folder)
    imported_s = time.perf_counter() - start
    checkpoints.export(output, imported.params, imported.hub.model, **imported.description(folder))
    exported_s = time.perf_counter() - start - imported_s
    peak_mib = peak_rss_mib()
    return {
        "import_s": imported_s, "export_s": exported_s, "before_mib": before_mib,
        "peak_mib": peak_mib,
    }  # fmt: skip


def import_in_fresh_process(folder: Path, output: Path) -> dict:
    code = (
        "import json, sys; from benchmarks.import_weights import import_once; "
        "print(json.dumps(import_once(sys.argv[1], sys.argv[2])))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(output)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def random_encoder(cfg: model_lib.ModelConfig):
    """(cfg, parameters) of a randomly initialised encoder."""
    spec = jnp.zeros((1, FRAMES, cfg.num_mel_bins))
    init = jax.jit(model_lib.Encoder(cfg).init)
    return cfg, nn.meta.unbox(init(jax.random.key(0), spec))["params"]


def imported_encoder(folder: Path):
    """(cfg, parameters) of the encoder of an imported EAT-layout folder."""
    imported = hf_weights.import_model(str(folder))
    return imported.hub.model, imported.params["encoder"]


def encoder_call(cfg: model_lib.ModelConfig, params, batch: int):
    """A jitted (B, 1024, 128) → tokens call and its arguments."""
    encoder = model_lib.Encoder(cfg)
    spec = jnp.asarray(np.random.default_rng(1).normal(size=(batch, FRAMES, 128)), jnp.float32)
    forward = jax.jit(lambda p, x: encoder.apply({"params": p}, x).tokens)
    return forward, (params, spec)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="base,large")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {common.machine()}; {common.versions(('jax', 'safetensors', 'numpy'))}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows, folders = [], {}
        for size in args.sizes.split(","):
            folders[size] = root / size
            file_bytes = write_folder(folders[size], SIZES[size])
            runs = [
                import_in_fresh_process(folders[size], root / f"export-{size}-{i}")
                for i in range(args.rounds)
            ]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            file_mib = file_bytes / 2**20
            rows.append([
                size, f"{file_mib:,.0f}", f"{med['import_s']:.2f}", f"{med['export_s']:.2f}",
                f"{med['before_mib']:,.0f}", f"{med['peak_mib']:,.0f}",
                f"{(med['peak_mib'] - med['before_mib']) / file_mib:.2f}",
            ])  # fmt: skip
        common.print_table(
            f"Importing an EAT-layout folder (medians of {args.rounds} fresh processes)",
            ["size", "model.safetensors MiB", "import s", "export s", "RSS before MiB",
             "peak RSS MiB", "(peak − before) / file"],
            rows,
        )  # fmt: skip
        if "base" not in folders:
            return
        eat = encoder_call(*imported_encoder(folders["base"]), args.batch)
        asda = encoder_call(*random_encoder(model_lib.preset("base")), args.batch)
        asda_s, eat_s = common.interleaved_medians([asda, eat], repeats=args.rounds * 3)
        common.print_table(
            f"Features at {FRAMES} frames, batch {args.batch} (medians, alternating rounds)",
            ["encoder", "s per batch", "clips/s", "ratio"],
            [
                ["ASDA base (release form)", f"{asda_s:.3f}", f"{args.batch / asda_s:.2f}", "1.00"],
                ["EAT base (imported)", f"{eat_s:.3f}", f"{args.batch / eat_s:.2f}",
                 f"{eat_s / asda_s:.2f}"],
            ],
        )  # fmt: skip


if __name__ == "__main__":
    main()
