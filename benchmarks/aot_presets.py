"""Every mesh preset × task compiled for its chips on this CPU host: memory, FLOPs, bytes,
collectives, roofline step time, MFU and the cost of 10 AS-2M epochs.

    python -m benchmarks.aot_presets [--presets v5e-8,v4-8] [--tasks pretrain,as20k]
    python -m benchmarks.aot_presets --presets gpu,gpu_fsdp --python /venv-cuda/bin/python
    python -m benchmarks.aot_presets --saved    # the table of the reports kept, compiling none

Each row is one ``launch/compile.py`` in its own process (``--python`` picks the
interpreter: one with the CUDA plugin for the GPU presets), its JSON report kept under
``--out``; a row whose report is already there is read back, so an interrupted sweep
resumes. The roofline (``asda_jax/aot.py``) takes the slower of the compiler's FLOPs
at the chip's peak and its bytes at the HBM bandwidth; MFU counts the analytic model
FLOPs (asda_jax/flop_counts.py) against that time. 10 AS-2M epochs are 10 × 1.9 M clips
(EAT's published cost for its 10 epochs: 230 GPU-hours on RTX 3090s).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asda_jax import aot, hlo
from benchmarks import common

TASKS = {
    "pretrain": "configs/pretrain_as2m.py",
    "as2m": "configs/finetune_as2m.py",
    "as20k": "configs/finetune_as20k.py",
}
TPU_PRESETS = (
    "v4-8", "v4-32", "v5e-8", "v5e-32", "v5e-256", "v5p-128", "2x-v5e-256",
    "v6e-8", "v6e-256", "v5e-1", "v6e-1", "tpu7x-8", "tpu7x-128",
)  # fmt: skip
AS2M_CLIPS, EPOCHS = 1_900_000, 10
MiB = 1024**2


def compile_row(
    python: str, preset: str, task: str, out: Path, extra: list[str], saved: bool
) -> dict | None:
    """The JSON report of one preset × task (compiled now unless already there, or
    None with ``saved``)."""
    path = out / f"{preset}-{task}.json"
    if saved and not path.exists():
        return None
    flags = [f"--config={TASKS[task]}:mesh={preset}", *extra]
    return {"preset": preset, "task": task} | common.compiled_report(python, flags, path)


def table_row(r: dict) -> list[str]:
    if "error" in r:
        return [r["preset"], r["task"], f"failed: {r['error'][-160:]}"] + [""] * 10
    rep = aot.report_from_counts(r)  # the figures by today's roofline, whoever compiled
    text = hlo.from_counts(r)
    per_clip = lambda flops: flops * rep.devices / rep.clips / 1e12
    compiler = "n/a" if rep.compiler_flops is None else f"{per_clip(rep.compiler_flops):.3f}"
    collectives = ", ".join(
        f"{c['kind']} ×{c['count']} {c['bytes'] / MiB:,.0f} MiB" for c in text.collectives
    )

    roofline = rep.step_seconds is not None
    hours = EPOCHS * AS2M_CLIPS / (rep.clips_per_second_per_chip or 1) / 3600
    return [
        r["preset"], r["task"], f"{rep.devices} × {r['topology']}", str(rep.clips),
        f"{rep.memory.total / MiB:,.0f} ({1 - rep.headroom:.0%})",
        f"{compiler} / {per_clip(rep.analytic_flops):.3f}",
        "n/a" if rep.bytes_accessed is None else f"{rep.bytes_accessed / 1e9:.1f}",
        collectives or "none",
        f"{rep.step_seconds * 1e3:.0f}" if roofline else "n/a",
        f"{rep.mfu:.0%}" if roofline else "n/a",
        f"{text.hbm_traffic / 1e9:.1f}",
        f"{rep.clips_per_second_per_chip:.1f}" if roofline else "n/a",
        f"{hours:,.0f}" if roofline and r["task"] == "pretrain" else "",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default=",".join(TPU_PRESETS))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--out", default="workdirs/aot")
    parser.add_argument("--extra", default="", help="more launch/compile.py flags, spaced")
    parser.add_argument("--saved", action="store_true", help="the saved reports only; compile none")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(common.machine())
    print(common.versions(("jax", "jaxlib", "libtpu", "jax-cuda12-plugin")))
    rows = [
        compile_row(args.python, preset, task, out, args.extra.split(), args.saved)
        for preset in args.presets.split(",")
        for task in args.tasks.split(",")
    ]
    rows = [r for r in rows if r is not None]
    common.print_table(
        "Compiled per preset and task (per device; roofline from the compiler's counts)",
        [
            "preset", "task", "devices", "clips", "memory MiB (of HBM)",
            "TFLOP/clip compiler / analytic", "GB accessed/step", "collectives",
            "roofline ms (estimate)", "MFU (estimate)", "HLO HBM GB", "clips/s/chip (estimate)",
            f"chip-h, {EPOCHS} AS-2M epochs",
        ],
        [table_row(r) for r in rows],
    )  # fmt: skip


if __name__ == "__main__":
    main()
