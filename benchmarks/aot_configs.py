"""Every config of configs/ compiled for one topology: the kernels it chose and its
per-chip memory, side by side with a previous sweep's (e.g. before a restructure).

    python -m benchmarks.aot_configs --topology=v5e:2x2 --out=workdirs/aot-configs
    python -m benchmarks.aot_configs --topology=h100:1x1x8 --configs=pretrain_as2m,finetune_as20k \
        --python=/venv-cuda/bin/python --out=... --baseline=<a previous --out>

Each row is one ``launch/compile.py`` in its own process (the config's own model and
batch; a config whose mesh preset is for other chips gets its data-parallel mesh over
the topology's), its JSON report kept under ``--out``, so an interrupted sweep resumes.
With ``--baseline`` each row says whether the attention backends, the custom calls and
every memory figure equal the baseline's. The synthetic and unlabelled-folder configs
need their datasets prepared under ``data/`` (their class counts).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import common

CONFIGS = (
    "demo", "pretrain_as2m", "pretrain_folder", "finetune_as20k", "finetune_as2m",
    "finetune_esc50", "finetune_spcv2", "finetune_demo",
)  # fmt: skip
MESH = {"demo": "", "finetune_demo": ":mesh=cpu"}  # the others: a preset of the topology's chip
MiB = 1024**2


def compile_row(python: str, name: str, topology: str, preset: str, out: Path) -> dict:
    """The JSON report of one config (compiled now unless already under ``out``)."""
    flags = [f"--config=configs/{name}.py{MESH.get(name, f':mesh={preset}')}"]
    return common.compiled_report(python, [*flags, f"--topology={topology}"], out / f"{name}.json")


def kernels(report: dict) -> str:
    calls = report["custom_calls"]
    named = {"tpu_custom_call": "Pallas", "__cudnn$fmhaSoftmax": "cuDNN fwd"}
    named["__cudnn$fmhaSoftmaxBackward"] = "cuDNN bwd"
    return ", ".join(f"{label} ×{calls[k]}" for k, label in named.items() if k in calls) or "none"


def row(name: str, report: dict, baseline: dict | None) -> list[str]:
    if "error" in report:
        return [name, f"failed: {report['error'][-160:]}", "", "", "", "", ""]
    m = report["memory"]
    attention = ", ".join(f"{n}: {b}" for n, b in report["attention"])
    cells = [
        name, attention, kernels(report), f"{m['total'] / MiB:,.1f}",
        f"{m['temporaries'] / MiB:,.1f}",
        "n/a" if report["bytes_accessed"] is None else f"{report['bytes_accessed'] / 1e9:.3f}",
    ]  # fmt: skip
    if baseline is None:
        return [*cells, ""]
    same = [
        what
        for what, key in (
            ("attention", "attention"),
            ("calls", "custom_calls"),
            ("memory", "memory"),
        )
        if report[key] == baseline[key]
    ]
    differ = sorted({"attention", "calls", "memory"} - set(same))
    return [*cells, "same " + ", ".join(same) if not differ else "DIFFERS: " + ", ".join(differ)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--topology", default="v5e:2x2")
    parser.add_argument("--preset", default="v5e-8", help="mesh preset of the configs' arguments")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--out", required=True)
    parser.add_argument("--baseline", default=None, help="a previous sweep's --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(common.machine())
    print(common.versions(("jax", "jaxlib", "libtpu", "jax-cuda12-plugin")))
    rows = []
    for name in args.configs.split(","):
        report = compile_row(args.python, name, args.topology, args.preset, out)
        saved = Path(args.baseline or "-") / f"{name}.json"
        rows.append(row(name, report, json.loads(saved.read_text()) if saved.exists() else None))
    common.print_table(
        f"Every config compiled for {args.topology} (per chip)",
        ["config", "attention (tokens: backend)", "kernels", "memory MiB", "temporaries MiB",
         "GB accessed", "vs baseline"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
