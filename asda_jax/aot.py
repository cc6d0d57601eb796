"""A run's training step compiled ahead of time for accelerators this host does not have.

``compile_step`` builds exactly what ``train_lib.train`` runs (the run config read for
the chip of the devices, the task, the state's shardings, the jitted step with the
state donated, the global batch's shapes and shardings) on *abstract* devices of a TPU
topology (``libtpu``) or of described GPUs (the CUDA plugin), and compiles it with the
accelerator's own compiler (MaxText's ``train_compile`` idea). ``report`` reads what
the compiled program says through the compiler's own analyses: per-chip memory against
the chip's HBM, the compiler's FLOPs and bytes next to the analytic count, the
attention backend of each sequence length, and a roofline step time (an estimate).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.experimental import topologies

from asda_jax import (
    attention,
    config_lib,
    hardware,
    sharding,
    train_lib,
    train_state,
)
from asda_jax.data import datasets, pipeline

# of the cuDNN wheel jax[cuda12]==0.10.2 installs (nvidia-cudnn-cu12 9.28)
CUDNN_VERSION = (9, 28, 0)


def gpu_target_config(chip: hardware.Chip) -> str:
    """The GpuTargetConfigProto text of a GPU chip from its row's ``gpu_target``."""
    t = chip.gpu_target
    if t is None:
        raise ValueError(f"{chip.description} has no GPU target description in hardware.CHIPS")
    major, minor = t.compute_capability
    cudnn = dict(zip(("major", "minor", "patch"), CUDNN_VERSION, strict=True))
    return (
        "gpu_device_info {\n"
        "  threads_per_block_limit: 1024\n  threads_per_warp: 32\n"
        "  shared_memory_per_block: 49152\n"
        f"  shared_memory_per_core: {t.shared_memory_per_core}\n"
        "  threads_per_core_limit: 2048\n"
        f"  core_count: {t.cores}\n  fpus_per_core: {t.fpus_per_core}\n"
        "  block_dim_limit_x: 2147483647\n  block_dim_limit_y: 65535\n"
        "  block_dim_limit_z: 65535\n"
        f"  memory_bandwidth: {t.bandwidth}\n  l2_cache_size: {t.l2_bytes}\n"
        f"  clock_rate_ghz: {t.clock_ghz}\n  device_memory_size: {t.memory_bytes}\n"
        f"  shared_memory_per_block_optin: {t.shared_memory_per_block_optin}\n"
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n"
        "  registers_per_core_limit: 65536\n  registers_per_block_limit: 65536\n"
        "}\n"
        'platform_name: "CUDA"\n'
        "dnn_version_info { " + " ".join(f"{k}: {v}" for k, v in cudnn.items()) + " }\n"
        f'device_description_str: "{chip.description}"\n'
    )


class CompilerMissing(RuntimeError):
    """The accelerator's compiler (libtpu, or the CUDA plugin) is not installed here."""


_COMPILERS = {"tpu": "pip install libtpu==0.0.42.1", "gpu": 'pip install "jax[cuda12]==0.10.2"'}


def abstract_devices(topology: str, num_slices: int = 1) -> list:
    """Devices of ``topology`` (a chip's short name and its grid, as the mesh presets in
    ``hardware`` name them; TPU topologies may span ``num_slices`` slices), without the
    hardware, as a TPU VM's JAX shows them (``hardware.Chip.topology_options``)."""
    chip = hardware.of_topology(topology)
    shape = topology.split(":", 1)[1]
    try:
        if chip.platform == "tpu":
            os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to hold a lock on
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=topology, num_slices=num_slices,
                **chip.topology_options(hardware.chip_grid(topology)),
            )  # fmt: skip
        else:
            if num_slices != 1:
                raise ValueError("slices are a TPU notion; describe GPUs as hosts x1xN")
            desc = topologies.get_topology_desc(
                topology_name="", platform="cuda", target_config=gpu_target_config(chip),
                topology=shape,
            )  # fmt: skip
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError) as e:
        # "topology not implemented for cuda" (no plugin), or libtpu's own words for its absence
        missing = ("not implemented", "Unknown backend", "not found", "No such", "Unable to")
        if not any(s in str(e) for s in missing):
            raise
        needs = _COMPILERS[chip.platform]
        raise CompilerMissing(f"compiling for {topology} needs {needs} ({e})") from e
    return list(desc.devices)


# ---------------------------------------------------------------------------- compiling


def batch_spec(task, mesh, classes: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the input pipeline feeds ``task``'s step, as shapes placed on
    ``mesh`` (the pipeline's own example layout, ``data.batch_size`` rows)."""
    example = pipeline.empty_features(classes, task.data_cfg)
    rows = task.data_cfg.batch_size
    where = sharding.batch_sharding(mesh)
    return {
        k: jax.ShapeDtypeStruct((rows, *np.shape(v)), np.asarray(v).dtype, sharding=where)
        for k, v in example.items()
    }


@dataclasses.dataclass(frozen=True)
class Step:
    """One run's step lowered for devices (and, once ``compile``d, compiled), with what
    shaped it."""

    lowered: jax.stages.Lowered
    mesh: jax.sharding.Mesh
    task: object
    attention_choices: tuple[tuple[int, str], ...]  # (sequence length, backend), distinct
    compiled: jax.stages.Compiled | None = None

    @property
    def clips(self) -> int:  # the global batch
        return self.task.data_cfg.batch_size

    def compile(self) -> Step:
        return dataclasses.replace(self, compiled=self.lowered.compile())


def lower_step(config, devices, *, process_count: int | None = None) -> Step:
    """``config``'s training step lowered for ``devices`` (real or abstract), as
    ``launch/train.py`` would run it on them. Raises ConfigError for a config that
    cannot run there (the checks ``train`` makes, without the data)."""
    run = config_lib.validate(
        config,
        chip=hardware.of_devices(devices),
        device_count=len(devices),
        process_count=process_count or config.get("num_processes") or 1,
        require_files=False,
    )
    mesh = sharding.make_mesh(run.mesh, devices, dcn_shape=run.mesh_dcn)
    task = train_lib.make_task(run)
    plan = train_state.plan_state(task, mesh, jax.random.PRNGKey(run.seed))
    step = train_state.jit_step(task, plan, mesh)
    # classes of the prepared dataset, else its builder's fixed count: no data needed
    classes = datasets.class_count(task.data_cfg.dataset, task.data_cfg.data_dir)
    batch = batch_spec(task, mesh, classes)
    with sharding.activate(mesh), attention.recorded_choices() as choices:
        lowered = step.lower(plan.restore_target(), batch)
    return Step(lowered, mesh, task, tuple(sorted(set(choices))))


def compile_step(config, devices, *, process_count: int | None = None) -> Step:
    """``lower_step``, compiled by the devices' compiler."""
    return lower_step(config, devices, process_count=process_count).compile()


# ---------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-chip bytes of the compiled step, as its compiler planned them."""

    arguments: int
    temporaries: int
    outputs: int
    aliased: int  # outputs written over donated arguments
    code: int

    @property
    def total(self) -> int:
        return self.arguments + self.temporaries + self.outputs - self.aliased + self.code


def memory_of(compiled) -> Memory:
    m = compiled.memory_analysis()
    return Memory(
        int(m.argument_size_in_bytes),
        int(m.temp_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.alias_size_in_bytes),
        int(m.generated_code_size_in_bytes),
    )


def cost_of(compiled) -> dict[str, float] | None:
    """The compiler's per-chip cost analysis (None where it gives none: GPU)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return dict(cost) if cost else None


@dataclasses.dataclass(frozen=True)
class Report:
    """What a compiled step's analyses say about one device of its topology (a chip, or
    on Ironwood one of its two TensorCores: ``hardware.Chip.devices_per_chip``)."""

    chip: hardware.Chip
    devices: int
    clips: int
    memory: Memory
    compiler_flops: float | None  # per device
    bytes_accessed: float | None  # per device
    analytic_flops: float  # per device
    attention: tuple[tuple[int, str], ...]

    @property
    def chips(self) -> float:
        return self.devices / self.chip.devices_per_chip

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.chip.hbm_bytes

    @property
    def headroom(self) -> float:
        return 1 - self.memory.total / self.chip.hbm_bytes

    @property
    def compute_seconds(self) -> float:
        """The step's FLOPs at peak: the compiler's, but never fewer than the model's (the
        compiler counts what runs inside a Pallas call only where the kernel declares a
        cost estimate)."""
        return max(self.compiler_flops or 0.0, self.analytic_flops) / self.chip.peak_flops

    @property
    def step_seconds(self) -> float | None:
        """Roofline (an estimate): the slower of the FLOPs at peak (``compute_seconds``)
        and the compiler's bytes at the HBM bandwidth; None where the compiler counts
        neither (GPU)."""
        if self.compiler_flops is None or self.bytes_accessed is None:
            return None
        return max(self.compute_seconds, self.bytes_accessed / self.chip.hbm_bandwidth)

    @property
    def mfu(self) -> float | None:
        """Model FLOPs (analytic) per device over the roofline step time at peak."""
        if self.step_seconds is None:
            return None
        return self.analytic_flops / (self.step_seconds * self.chip.peak_flops)

    @property
    def clips_per_second_per_chip(self) -> float | None:
        return None if self.step_seconds is None else self.clips / self.chips / self.step_seconds


def counts_of(rep: Report) -> dict:
    """A report as JSON: its counts (what ``report_from_counts`` reads back) and, for
    readers of the file, the figures derived from them."""
    return dict(
        chip=rep.chip.name, devices=rep.devices, chips=rep.chips, clips=rep.clips,
        memory=vars(rep.memory) | {"total": rep.memory.total}, fits=rep.fits,
        headroom=rep.headroom, compiler_flops=rep.compiler_flops,
        bytes_accessed=rep.bytes_accessed, analytic_flops=rep.analytic_flops,
        step_seconds=rep.step_seconds, mfu=rep.mfu,
        clips_per_second_per_chip=rep.clips_per_second_per_chip,
        attention=[list(a) for a in rep.attention],
    )  # fmt: skip


def report_from_counts(saved: dict) -> Report:
    """A report back from the counts a JSON report keeps (``launch/compile.py --json``),
    its derived figures recomputed with this version's chip figures."""
    try:
        chip = hardware.chip(saved.get("chip", ""))
    except ValueError as e:
        raise ValueError(f"a report of chip {saved.get('chip')!r}: {e}") from e
    memory = Memory(**{k: v for k, v in saved["memory"].items() if k != "total"})
    fields = ("devices", "clips", "compiler_flops", "bytes_accessed", "analytic_flops")
    attention = tuple(tuple(a) for a in saved["attention"])
    # reports written while every chip was one device count their devices as "chips"
    counts = {"devices": saved.get("chips")} | {f: saved[f] for f in fields if f in saved}
    return Report(chip=chip, memory=memory, attention=attention, **counts)


def report(step: Step) -> Report:
    """The report of a compiled step, for the chip of its devices."""
    cost = cost_of(step.compiled)
    devices = step.mesh.devices.size
    return Report(
        chip=hardware.of_mesh(step.mesh),
        devices=devices,
        clips=step.clips,
        memory=memory_of(step.compiled),
        compiler_flops=cost.get("flops") if cost else None,
        bytes_accessed=cost.get("bytes accessed") if cost else None,
        analytic_flops=step.task.step_flops(step.clips) / devices,
        attention=step.attention_choices,
    )
