"""Compiles a run's training step for its TPU or GPU topology on this host, no chips needed.

    pip install libtpu==0.0.42.1            # TPU topologies (or: pip install -e .[tpu])
    pip install "jax[cuda12]==0.10.2"       # GPU descriptions (a ~4 GB install)
    python launch/compile.py --config=configs/pretrain_as2m.py:mesh=v5e-8
    python launch/compile.py --config=configs/pretrain_as2m.py:mesh=2x-v5e-256
    python launch/compile.py --config=configs/finetune_as20k.py:mesh=gpu --topology=h100:1x1x1

Builds what launch/train.py would run (task, state shardings, the donated jitted step,
the batch's shapes and shardings) on abstract devices of the preset's topology (or
--topology; --num_slices for multi-slice TPU, default from the preset's mesh_dcn) and
compiles it with the accelerator's compiler. Prints per-chip memory against HBM, the
compiler's FLOPs and bytes next to the analytic count, the attention backend per
sequence length and a roofline step time (asda_jax/aot.py; the chips' published
figures and their sources are in asda_jax/hardware.py), and from the program's HLO
text its collectives, custom calls and op traffic (asda_jax/hlo.py). No data or
checkpoint is read.

Exit codes: 0 fits, 1 does not fit its chips' memory, 2 bad config, 5 the compiler for
that platform is not installed.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata server here
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no GPU driver here

import json
import math
import time

from absl import app, flags, logging
from ml_collections import config_flags

from asda_jax import aot, cli, config_lib, hlo

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).")
flags.DEFINE_string("topology", None, "Chips to compile for, e.g. v5e:2x4 (default: the preset's).")
flags.DEFINE_integer("num_slices", None, "TPU slices (default: from the config's mesh_dcn).")
flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
flags.DEFINE_string("hlo", None, "Also write the compiled program's HLO text to this file.")
flags.DEFINE_integer("traffic", 0, "Print the N op scopes and opcodes moving the most bytes.")
flags.mark_flags_as_required(["config"])

MiB = 1024**2


def report_rows(rep: aot.Report, text: hlo.HloSummary) -> list[tuple[str, str]]:
    m, chip = rep.memory, rep.chip
    flops = rep.compiler_flops
    hbm_seconds = text.hbm_step_seconds(rep)
    rows = [
        ("devices", f"{rep.devices} × {chip.description} ({rep.chips:g} chips)"),
        ("global batch", f"{rep.clips} clips ({rep.clips / rep.devices:g} per device)"),
        ("memory per device", f"{m.total / MiB:,.0f} MiB of {chip.hbm_bytes / MiB:,.0f} MiB "
         f"({1 - rep.headroom:.0%}; headroom {rep.headroom:.0%})"),
        ("  arguments / temporaries / outputs / aliased / code (MiB)",
         " / ".join(f"{b / MiB:,.0f}" for b in (m.arguments, m.temporaries, m.outputs,
                                                m.aliased, m.code))),
        ("FLOPs per device, compiler", "n/a (GPU)" if flops is None else f"{flops / 1e12:.3f} T"),
        ("FLOPs per device, analytic", f"{rep.analytic_flops / 1e12:.3f} T"),
        ("bytes accessed per device", "n/a (GPU)" if rep.bytes_accessed is None
         else f"{rep.bytes_accessed / 1e9:.2f} GB"),
        ("roofline step (estimate)", "n/a (the GPU compiler counts no FLOPs or bytes)"
         if rep.step_seconds is None else f"{rep.step_seconds * 1e3:.1f} ms; MFU {rep.mfu:.0%}; "
         f"{rep.clips_per_second_per_chip:.1f} clips/s per chip"),
        ("HLO op traffic per device (estimate)", f"{text.hbm_traffic / 1e9:.2f} GB in HBM, "
         f"{text.on_chip_traffic / 1e9:.2f} GB in on-chip memory spaces"),
        ("roofline, HBM traffic only (estimate)", "n/a" if hbm_seconds is None
         else f"{hbm_seconds * 1e3:.1f} ms; MFU {text.hbm_mfu(rep):.0%}"),
        ("attention", ", ".join(f"{n} tokens: {b}" for n, b in rep.attention) or "none"),
        ("custom calls", ", ".join(f"{k} ×{v}" for k, v in sorted(text.custom_calls.items()))
         or "none"),
    ]  # fmt: skip
    for c in text.collectives:
        where = (
            ""
            if c["crosses_slices"] is None
            else (", crosses slices" if c["crosses_slices"] else ", within slices")
        )
        rows.append((f"collective {c['kind']} (groups of {c['group_size']}{where})",
                     f"×{c['count']}, {c['bytes'] / MiB:,.1f} MiB"))  # fmt: skip
    return rows


def print_traffic(traffic: dict, top: int) -> None:
    """Where the bytes go (hlo.traffic): the busiest op scopes and opcodes."""
    total = sum(traffic["by_scope"].values())
    print(f"  traffic of the entry computation's ops: {total / 1e9:.2f} GB in the default memory "
          f"space, {traffic['other_memory'] / 1e9:.2f} GB in others")  # fmt: skip
    for what in ("by_scope", "by_opcode"):
        rows = sorted(traffic[what].items(), key=lambda kv: -kv[1])[:top]
        for name, size in rows:
            print(f"    {what[3:]:<6} {size / 1e9:8.2f} GB  {size / total:4.0%}  {name}")


def main(argv):
    del argv
    config = FLAGS.config
    topology = FLAGS.topology or config.get("topology")
    if not topology:
        logging.error("this config's mesh preset names no topology: pass --topology=v5e:2x4")
        return 2
    dcn = dict(config.get("mesh_dcn") or {})
    slices = FLAGS.num_slices or (math.prod(dcn.values()) if dcn else 1)
    started = time.perf_counter()
    try:
        devices = aot.abstract_devices(topology, slices)
        step = aot.compile_step(config, devices)
    except aot.CompilerMissing as e:
        logging.error("%s", e)
        return 5
    except (config_lib.ConfigError, ValueError) as e:
        logging.error("config cannot run on %s: %s", topology, e)
        return 2
    seconds = time.perf_counter() - started
    rep = aot.report(step)
    program = step.compiled.as_text()
    text = hlo.summary(program, list(step.mesh.devices.flat))
    print(f"{config.task} step for {topology} × {slices} slice(s), compiled in {seconds:.0f} s")
    rows = report_rows(rep, text)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if FLAGS.traffic:
        print_traffic(text.traffic, FLAGS.traffic)
    if FLAGS.hlo:
        with open(FLAGS.hlo, "w") as f:
            f.write(program)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            saved = aot.counts_of(rep) | hlo.counts_of(text)
            json.dump(saved | dict(topology=topology, compile_seconds=seconds), f, indent=2)
    if not rep.fits:
        logging.error(
            "does not fit: %.0f MiB per device > %.0f MiB of HBM; lower data.batch_size, set "
            "execution.remat_policy, or shard the state (mesh fsdp)",
            rep.memory.total / MiB, rep.chip.hbm_bytes / MiB,
        )  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    cli.start()  # before the flags: a config file may already read a gs:// path
    app.run(main)
