"""One pretraining step of the base model: time, FLOP/s vs the matmul roof, memory, PyTorch.

    python -m benchmarks.train_step [--clips 1] [--repeats 3]

The step is the release's (16 clones × 103 tokens through the student, 513 through
the EMA teacher, the CNN decoder, AdamW, the EMA update) at ``--clips`` clips. FLOPs
are counted analytically in the naive form (two QKᵀ and one A·V per differential
head, backward = 2× forward), so a kernel that does extra work shows as lost
utilisation. The roof is a float32 2048³ matmul timed in this process, per library.
The PyTorch row is an independent re-implementation (asda_jax/testing/torch_reference.py) of the
same model and objective; each JAX variant is timed against it in alternating blocks
of 3 steps (the first after a switch dropped: switching between two multi-GiB
working sets slowed the next step by up to 40 %), one JAX variant alive at a time.
Memory is XLA's compiled plan (temporaries + outputs) and the peak resident set of a
fresh process running two steps of that variant (model, optimiser and all). The script
re-executes itself with the launcher's process settings, as ``launch/train.py`` does
(``asda_jax/launch_env.py``): glibc's huge-page malloc tunable, which PyTorch's
allocations get too, and one OpenBLAS thread, which neither side's step uses (XLA has
its own kernels, PyTorch's wheel MKL). Run it with ``ASDA_JAX_DEFAULT_MALLOC=1`` to time
the system's default malloc.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch

from asda_jax import (
    config_lib,
    flop_counts,
    hardware,
    launch_env,
    masking,
    sharding,
    train_lib,
    train_state,
)
from asda_jax import model as model_lib
from asda_jax.testing import torch_reference as ref
from benchmarks import common

FRAMES, DIM, DEPTH, HEADS, CLONES = 1024, 768, 12, 12, 16


def step_flops(clips: int) -> float:
    """Analytic FLOPs of one step (matmuls and convolutions only)."""
    return flop_counts.pretraining_step(
        model_lib.ModelConfig(), masking.MaskConfig(), clips, FRAMES
    )


def matmul_roof() -> tuple[float, float]:
    """float32 GFLOP/s of a 2048³ matmul in JAX and in PyTorch on this machine."""
    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n))
    ta = torch.randn(n, n)
    mm = jax.jit(lambda x: x @ x)
    jax_s, torch_s = common.interleaved_medians([(mm, (a,)), (lambda: ta @ ta, ())], repeats=10)
    return 2 * n**3 / jax_s / 1e9, 2 * n**3 / torch_s / 1e9


def jax_step(clips: int, remat: str):
    config = config_lib.load_file("configs/pretrain_as2m.py", "mesh=cpu")
    config.execution.remat_policy = remat
    config.data.batch_size = clips
    task = train_lib.make_task(config_lib.read(config, hardware.HOST))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    plan = train_state.plan_state(task, mesh, jax.random.PRNGKey(0))
    state = train_state.create_state(plan, mesh, jax.random.PRNGKey(0))
    step = train_state.jit_step(task, plan, mesh)
    spec = jax.random.normal(jax.random.key(1), (clips, FRAMES, 128))
    batch = {"spectrogram": spec, "frames": jnp.full((clips,), FRAMES, jnp.int32)}
    with sharding.activate(mesh):
        compiled = step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], batch)
        return metrics["loss"]

    return run, memory.temp_size_in_bytes + memory.output_size_in_bytes


def torch_step(clips: int):
    torch.manual_seed(0)
    student = ref.ReleaseModel(decoder_layers=6, decoder_groups=16, decoder_grid=(FRAMES // 16, 8))
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.05
    )
    spec = torch.randn(clips, FRAMES, 128)
    kept, masked = masking.clone_masks(
        jax.random.key(2), clips, (FRAMES // 16, 8), masking.MaskConfig()
    )
    kept = torch.from_numpy(np.asarray(kept)).long()
    masked = torch.from_numpy(np.asarray(masked))
    teacher_params = dict(teacher.named_parameters())

    def run():
        noise = 0.01 * torch.randn(*masked.shape, DIM)
        loss = ref.pretraining_objective(student, teacher, spec, kept, masked, noise, CLONES, DEPTH)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 4.0)
        optimizer.step()
        with torch.no_grad():
            for name, p in student.named_parameters():
                if name in teacher_params:
                    teacher_params[name].lerp_(p, 1 - 0.9998)
        return loss

    return run


def peak_rss(clips: int, variant: str) -> float:
    """Peak resident memory (GiB) of a fresh process that runs two steps of ``variant``."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.train_step",
        f"--clips={clips}",
        f"--rss_of={variant}",
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def report_own_rss(clips: int, variant: str) -> None:
    run = torch_step(clips) if variant == "torch" else jax_step(clips, variant)[0]
    for _ in range(2):
        jax.block_until_ready(run())
    print(peak_resident_gib())


def peak_resident_gib() -> float:
    """This process image's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries
    that across fork + exec, so a child would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError("no VmHWM in /proc/self/status")


def row(name, seconds, flops, roof, torch_seconds, plan_bytes, clips, variant="torch"):
    """One table row: time, FLOP/s, roof fraction, ratio to PyTorch, XLA plan, peak RSS."""
    achieved = flops / seconds / 1e9
    plan = "n/a" if plan_bytes is None else f"{plan_bytes / 2**30:.2f}"
    return [
        name,
        f"{seconds:.2f}",
        f"{achieved:.1f}",
        f"{achieved / roof:.0%}",
        f"{seconds / torch_seconds:.2f}×",
        plan,
        f"{peak_rss(clips, variant):.2f}",
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="alternating blocks")
    parser.add_argument("--rss_of", help=argparse.SUPPRESS)  # internal: one variant's peak RSS
    args = parser.parse_args()
    launch_env.reexec_with_launcher_environment()  # as launch/train.py; children inherit
    if args.rss_of:
        return report_own_rss(args.clips, args.rss_of)
    torch.set_num_threads(os.cpu_count())  # as many threads as XLA uses
    print(f"machine: {common.machine()}\nversions: {common.versions(('jax', 'flax', 'torch'))}")
    print(f"GLIBC_TUNABLES: {os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    roof_jax, roof_torch = matmul_roof()
    flops = step_flops(args.clips)
    torch_run = torch_step(args.clips)
    rows, torch_times = [], []
    for remat in ("none", "dots_no_batch", "full"):  # one JAX variant alive at a time
        jax_run, peak = jax_step(args.clips, remat)
        jax_s, torch_s = common.interleaved_medians(
            [(jax_run, ()), (torch_run, ())], repeats=args.repeats, warmup=1, per_round=3
        )
        del jax_run
        gc.collect()
        torch_times.append(torch_s)
        rows.append(
            row(f"JAX, remat={remat}", jax_s, flops, roof_jax, torch_s, peak, args.clips, remat)
        )
    torch_s = float(np.median(torch_times))
    rows.append(
        row("PyTorch 2.13 eager (reference)", torch_s, flops, roof_torch, torch_s, None, args.clips)
    )
    print(f"\nstep FLOPs (analytic, naive form): {flops / 1e12:.3f} TFLOP for {args.clips} clip(s)")
    print(
        f"float32 matmul roof (2048³): JAX {roof_jax:.0f} GFLOP/s, PyTorch {roof_torch:.0f} GFLOP/s"
    )
    common.print_table(
        f"Base model pretraining step, {args.clips} clip × {CLONES} clones, float32, "
        f"median of {2 * args.repeats} steps",
        [
            "implementation",
            "s/step",
            "GFLOP/s",
            "of own roof",
            "vs PyTorch",
            "XLA plan GiB",
            "peak RSS GiB",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
