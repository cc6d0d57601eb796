"""A run's training step compiled ahead of time for accelerators this host does not have.

``compile_step`` builds exactly what ``train_lib.train`` runs (the task for the platform
of the mesh's devices, the state's shardings, the jitted step with the state donated,
the global batch's shapes and shardings) on *abstract* devices of a TPU topology
(``libtpu``) or of described GPUs (the CUDA plugin), and compiles it with the
accelerator's own compiler. ``report`` reads the compiled program: per-chip memory
against the chip's HBM, the compiler's FLOPs and bytes next to the analytic count, the
collectives it holds, the attention backend of each sequence length, and a roofline
step time. launch/compile.py prints it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re

import jax
import numpy as np
from jax.experimental import topologies

from asda_jax import (
    attention,
    config_lib,
    flop_counts,
    platforms,
    pretraining,
    sharding,
    train_lib,
    train_state,
)
from asda_jax.data import datasets, pipeline

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's published figures (dense bf16 peak, HBM size and bandwidth)."""

    name: str
    platform: str  # "tpu" | "gpu"
    peak_flops: float  # FLOP/s, dense bfloat16
    hbm_bytes: int
    hbm_bandwidth: float  # bytes/s
    source: str


CHIPS = {
    "v4": Chip("TPU v4", "tpu", 275e12, 32 * GiB, 1228e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", "tpu", 197e12, 16 * GiB, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", "tpu", 459e12, 95 * GiB, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "h100": Chip(
        "NVIDIA H100 80GB HBM3 (SXM)", "gpu", 989e12, 80 * 10**9, 3.35e12,
        "nvidia.com/en-us/data-center/h100 (datasheet, dense BF16)",
    ),
    "a100": Chip(
        "NVIDIA A100 80GB (SXM)", "gpu", 312e12, 80 * 10**9, 2.039e12,
        "nvidia.com/en-us/data-center/a100 (datasheet, dense BF16)",
    ),
}  # fmt: skip

# What the CUDA compiler needs of a GPU it does not see (stream_executor's
# GpuTargetConfigProto, text form): the published figures of each chip.
_GPU_TARGETS = {
    "h100": dict(
        cc=(9, 0), cores=132, fpus=128, clock=1.98, memory=84_978_434_048,
        bandwidth=3_352_320_000_000, l2=52_428_800, smem_core=233_472, smem_optin=232_448,
    ),
    "a100": dict(
        cc=(8, 0), cores=108, fpus=64, clock=1.41, memory=85_899_345_920,
        bandwidth=2_039_000_000_000, l2=41_943_040, smem_core=167_936, smem_optin=166_912,
    ),
}  # fmt: skip
# of the cuDNN wheel jax[cuda12]==0.10.2 installs (nvidia-cudnn-cu12 9.28)
CUDNN_VERSION = (9, 28, 0)


def gpu_target_config(chip: str) -> str:
    """The GpuTargetConfigProto text of ``chip`` (a key of ``_GPU_TARGETS``)."""
    t = _GPU_TARGETS[chip]
    major, minor = t["cc"]
    cudnn = dict(zip(("major", "minor", "patch"), CUDNN_VERSION, strict=True))
    return (
        "gpu_device_info {\n"
        "  threads_per_block_limit: 1024\n  threads_per_warp: 32\n"
        "  shared_memory_per_block: 49152\n"
        f"  shared_memory_per_core: {t['smem_core']}\n"
        "  threads_per_core_limit: 2048\n"
        f"  core_count: {t['cores']}\n  fpus_per_core: {t['fpus']}\n"
        "  block_dim_limit_x: 2147483647\n  block_dim_limit_y: 65535\n"
        "  block_dim_limit_z: 65535\n"
        f"  memory_bandwidth: {t['bandwidth']}\n  l2_cache_size: {t['l2']}\n"
        f"  clock_rate_ghz: {t['clock']}\n  device_memory_size: {t['memory']}\n"
        f"  shared_memory_per_block_optin: {t['smem_optin']}\n"
        f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n"
        "  registers_per_core_limit: 65536\n  registers_per_block_limit: 65536\n"
        "}\n"
        'platform_name: "CUDA"\n'
        "dnn_version_info { " + " ".join(f"{k}: {v}" for k, v in cudnn.items()) + " }\n"
        f'device_description_str: "{CHIPS[chip].name}"\n'
    )


class CompilerMissing(RuntimeError):
    """The accelerator's compiler (libtpu, or the CUDA plugin) is not installed here."""


_COMPILERS = {"tpu": "pip install libtpu==0.0.42.1", "gpu": 'pip install "jax[cuda12]==0.10.2"'}


def chip_of_topology(topology: str) -> str:
    """The CHIPS key of a topology name: "v5e:2x4" → "v5e", "h100:1x1x8" → "h100"."""
    chip = topology.split(":")[0]
    if chip not in CHIPS:
        raise ValueError(f"unknown chip in topology {topology!r}; one of {sorted(CHIPS)}")
    return chip


# A TPU VM's JAX shows one device per v4 chip (its two TensorCores as one "megacore");
# libtpu's topology description defaults to one per TensorCore (8 devices for v4-8).
_TPU_CHIP_CONFIG = {"v4": {"chip_config_name": "megacore"}}


def abstract_devices(topology: str, num_slices: int = 1) -> list:
    """Devices of ``topology`` ("v5e:2x4", "v4:2x2x1", "h100:1x1x8"; TPU topologies may
    span ``num_slices`` slices), without the hardware."""
    chip = chip_of_topology(topology)
    shape = topology.split(":", 1)[1]
    try:
        if CHIPS[chip].platform == "tpu":
            os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to hold a lock on
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=topology, num_slices=num_slices,
                **_TPU_CHIP_CONFIG.get(chip, {}),
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
        needs = _COMPILERS[CHIPS[chip].platform]
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
    platform = platforms.of_devices(devices)
    processes = process_count or config.get("num_processes") or 1
    config_lib.validate(
        config,
        device_count=len(devices),
        process_count=processes,
        platform=platform,
        require_files=False,
    )
    mesh = sharding.make_mesh(dict(config.mesh), devices, dcn_shape=config.get("mesh_dcn"))
    task = train_lib.make_task(config, platforms.of_mesh(mesh))
    plan = train_state.plan_state(task, mesh, jax.random.PRNGKey(config.seed))
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


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(pred|[fsu]\d+|bf16)\[([\d,]*)\]")
# an HLO instruction line: name, shape, opcode, the rest
_NAMED = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](T\(([\d,]+)\))?")
_LIST_GROUPS = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")


def array_bytes(shape_text: str) -> int:
    """Bytes of every array in an HLO shape (``bf16[4,128]`` or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += count * _DTYPE_BYTES.get(dtype, 4)
    return total


def replica_groups(attributes: str) -> list[list[int]] | None:
    """The replica groups of a collective's attributes: the mesh form
    (``mesh['axis_0'=4,'axis_1'=2] {'axis_0'}``: devices varying over the named axes of
    an iota grid form a group), the iota form (``[2,4]<=[8]``) or a list."""
    if m := _MESH_GROUPS.search(attributes):
        axes = [a.split("=") for a in m.group(1).split(",")]
        names = [name.strip("' ") for name, _ in axes]
        sizes = [int(size) for _, size in axes]
        grouped = [names.index(a.strip("' ")) for a in m.group(2).split(",") if a.strip()]
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in grouped]
        size = math.prod(sizes[i] for i in grouped)
        return ids.transpose(rest + grouped).reshape(-1, size).tolist()
    if m := _IOTA_GROUPS.search(attributes):
        groups, size = int(m.group(1)), int(m.group(2))
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(5):
            ids = ids.transpose([int(d) for d in m.group(5).split(",")])
        return ids.reshape(groups, size).tolist()
    if m := _LIST_GROUPS.search(attributes):
        return [
            [int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", m.group(1))
        ]
    return None


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int  # of its result, per chip
    group_size: int | None
    crosses_slices: bool | None  # None: a single slice


_DCN_TRANSFER = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def collectives_of(hlo_text: str, devices) -> list[Collective]:
    """Every collective of a compiled program's HLO (async pairs once, by their start).
    ``devices`` are the program's devices in partition order (to tell slices apart).
    Across TPU slices the compiler reduces within each slice over ICI, then hands the
    partial results to the multi-slice runtime as host ``send``/``recv`` pairs marked
    ``_xla_megascale_transfer_type``: each send is one collective over the data-centre
    network ("dcn-all-reduce", ...), counted as crossing slices."""
    slices = [getattr(d, "slice_index", 0) for d in devices]
    multi_slice = len(set(slices)) > 1
    found = []
    for line in hlo_text.splitlines():
        m = _NAMED.match(line)
        if not m:
            continue
        _, shape, opcode, rest = m.groups()
        if opcode == "send" and (dcn := _DCN_TRANSFER.search(rest)):
            kind = "dcn-" + dcn.group(1).lower().replace("_", "-")
            data = _top_level(shape)[0]  # (data, context, token)
            found.append(Collective(kind, array_bytes(data), len(set(slices)), True))
            continue
        kind = opcode.removesuffix("-start")
        if kind not in COLLECTIVES:
            continue
        groups = replica_groups(rest)
        crosses = None
        if multi_slice and groups:
            crosses = any(len({slices[i] for i in g}) > 1 for g in groups if g)
        size = len(groups[0]) if groups and groups[0] else None
        found.append(Collective(kind, array_bytes(_result_shape(shape, opcode)), size, crosses))
    return found


def summarise_collectives(found: list[Collective]) -> list[dict]:
    """Rows of (kind, group size, crosses slices): count and bytes per chip."""
    rows = collections.defaultdict(lambda: [0, 0])
    for c in found:
        key = (c.kind, c.group_size, c.crosses_slices)
        rows[key][0] += 1
        rows[key][1] += c.bytes
    return [
        dict(kind=k, group_size=g, crosses_slices=x, count=n, bytes=b)
        for (k, g, x), (n, b) in sorted(rows.items(), key=lambda kv: str(kv[0]))
    ]


def custom_calls(hlo_text: str) -> collections.Counter:
    """Custom-call targets of a compiled program and how often each appears."""
    return collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo_text))


def analytic_flops(task, clips: int) -> float:
    """The step's FLOPs counted from the model (all chips together)."""
    frames = task.data_cfg.target_frames
    if isinstance(task, pretraining.PretrainTask):
        return flop_counts.pretraining_step(task.model_cfg, task.mask_cfg, clips, frames)
    return flop_counts.finetuning_step(task.model_cfg, clips, frames, task.frozen)


@dataclasses.dataclass(frozen=True)
class Report:
    """What a compiled step says about one chip of its topology."""

    chip: Chip
    chips: int
    clips: int
    memory: Memory
    compiler_flops: float | None  # per chip
    bytes_accessed: float | None  # per chip
    analytic_flops: float  # per chip
    collectives: list[dict]
    attention: tuple[tuple[int, str], ...]
    custom_calls: dict[str, int]
    traffic: dict  # ``traffic`` of the compiled HLO (per chip)

    @property
    def hbm_traffic(self) -> float:
        """The HLO's op traffic in the default memory space (HBM), per chip."""
        return float(sum(self.traffic["by_scope"].values()))

    @property
    def on_chip_traffic(self) -> float:
        """In other memory spaces (TPU: on-chip), not HBM."""
        return float(self.traffic["other_memory"])

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.chip.hbm_bytes

    @property
    def headroom(self) -> float:
        return 1 - self.memory.total / self.chip.hbm_bytes

    @property
    def compute_seconds(self) -> float:
        """The step's FLOPs at peak: the compiler's, but never fewer than the model's (the
        compiler does not count what runs inside custom calls, e.g. Pallas kernels)."""
        return max(self.compiler_flops or 0.0, self.analytic_flops) / self.chip.peak_flops

    @property
    def step_seconds(self) -> float | None:
        """Roofline: the slower of the FLOPs at peak (``compute_seconds``) and the
        compiler's bytes at the HBM bandwidth; None where the compiler counts neither (GPU)."""
        if self.compiler_flops is None or self.bytes_accessed is None:
            return None
        return max(self.compute_seconds, self.bytes_accessed / self.chip.hbm_bandwidth)

    @property
    def mfu(self) -> float | None:
        """Model FLOPs (analytic) per chip over the roofline step time at peak."""
        if self.step_seconds is None:
            return None
        return self.analytic_flops / (self.step_seconds * self.chip.peak_flops)

    @property
    def clips_per_second_per_chip(self) -> float | None:
        return None if self.step_seconds is None else self.clips / self.chips / self.step_seconds

    @property
    def hbm_step_seconds(self) -> float:
        """Roofline with the HLO's default-memory-space traffic as the bytes (``traffic``:
        an estimate that leaves out what moves within on-chip memory)."""
        return max(self.compute_seconds, self.hbm_traffic / self.chip.hbm_bandwidth)

    @property
    def hbm_mfu(self) -> float:
        return self.analytic_flops / (self.hbm_step_seconds * self.chip.peak_flops)


def counts_of(rep: Report) -> dict:
    """A report as JSON: its counts (what ``report_from_counts`` reads back) and, for
    readers of the file, the figures derived from them."""
    return dict(
        chip=rep.chip.name, chips=rep.chips, clips=rep.clips,
        memory=vars(rep.memory) | {"total": rep.memory.total}, fits=rep.fits,
        headroom=rep.headroom, compiler_flops=rep.compiler_flops,
        bytes_accessed=rep.bytes_accessed, analytic_flops=rep.analytic_flops,
        step_seconds=rep.step_seconds, mfu=rep.mfu,
        clips_per_second_per_chip=rep.clips_per_second_per_chip,
        hbm_traffic=rep.hbm_traffic, on_chip_traffic=rep.on_chip_traffic, traffic=rep.traffic,
        hbm_step_seconds=rep.hbm_step_seconds, hbm_mfu=rep.hbm_mfu,
        collectives=rep.collectives, attention=[list(a) for a in rep.attention],
        custom_calls=rep.custom_calls,
    )  # fmt: skip


def report_from_counts(saved: dict) -> Report:
    """A report back from the counts a JSON report keeps (``launch/compile.py --json``):
    its derived figures recomputed here, whichever version wrote it."""
    known = {c.name: c for c in CHIPS.values()}
    if saved.get("chip") not in known:
        raise ValueError(
            f"a report of chip {saved.get('chip')!r}; this version knows {sorted(known)}"
        )
    chip = known[saved["chip"]]
    memory = Memory(**{k: v for k, v in saved["memory"].items() if k != "total"})
    fields = ("chips", "clips", "compiler_flops", "bytes_accessed", "analytic_flops",
              "collectives", "custom_calls", "traffic")  # fmt: skip
    attention = tuple(tuple(a) for a in saved["attention"])
    return Report(chip=chip, memory=memory, attention=attention, **{f: saved[f] for f in fields})


def report(step: Step, chip: str) -> Report:
    text = step.compiled.as_text()
    cost = cost_of(step.compiled)
    chips = step.mesh.devices.size
    return Report(
        chip=CHIPS[chip],
        chips=chips,
        clips=step.clips,
        memory=memory_of(step.compiled),
        compiler_flops=cost.get("flops") if cost else None,
        bytes_accessed=cost.get("bytes accessed") if cost else None,
        analytic_flops=analytic_flops(step.task, step.clips) / chips,
        collectives=summarise_collectives(collectives_of(text, list(step.mesh.devices.flat))),
        attention=step.attention_choices,
        custom_calls=dict(custom_calls(text)),
        traffic=traffic(text),
    )


# ---------------------------------------------------------------------------- traffic

_OPERAND = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "after-all"}
_ASYNC_DONE = re.compile(r"-done$")


def _top_level(shape_text: str) -> list[str]:
    """The elements of an HLO tuple shape (a non-tuple shape: itself)."""
    if not shape_text.startswith("("):
        return [shape_text]
    parts, depth, current = [], 0, ""
    for ch in shape_text[1:-1]:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [*parts, current.strip()]


def _result_shape(shape_text: str, opcode: str) -> str:
    """The result in an instruction's shape: an async start's shape is (operands,
    result[, context...]), operands and results each one array or one tuple, except an
    all-reduce-start's, which is its result alone."""
    if not opcode.endswith("-start") or opcode == "all-reduce-start":
        return shape_text
    return _top_level(shape_text)[1]


def _shape_bytes(shape_text: str) -> tuple[int, int]:
    """(bytes in the default memory space, bytes in others) of an HLO shape; a layout's
    ``S(n)``, n > 0, places an array in another memory space (on TPU: on-chip)."""
    main = other = 0
    for piece in _top_level(shape_text):
        if piece.startswith("("):
            inner = _shape_bytes(piece)
            main, other = main + inner[0], other + inner[1]
            continue
        space = _MEMORY_SPACE.search(piece)
        if space and space.group(1) != "0":
            other += array_bytes(piece)
        else:
            main += array_bytes(piece)
    return main, other


def scope_of(op_name: str) -> str:
    """A readable place for an op: pass (forward/backward) and module path without
    block numbers, e.g. "backward Encoder.contextualize/attn/qk"."""
    name = op_name.removeprefix("jit(<lambda>)/")
    backward = name.startswith("transpose(")
    parts = [p for p in name.split("/") if p]
    module = [re.sub(r"^(transpose|jvp|vmap|remat|checkpoint)\(|\)+$", "", p) for p in parts]
    module = [re.sub(r"^(transpose|jvp)\(", "", p) for p in module]
    kept = [p for p in module[:-1] if not re.fullmatch(r"blocks_\d+", p)][:3]
    where = "/".join(kept) or "(top)"
    return f"{'backward' if backward else 'forward'} {where}"


def traffic(hlo_text: str) -> dict[str, dict[str, float]]:
    """Bytes each top-level op of the entry computation reads and writes, summed per
    ``scope_of`` its op name and per opcode: {"by_scope": .., "by_opcode": ..,
    "other_memory": bytes in other memory spaces}. An estimate of where a program's
    memory traffic goes (a fusion's operands and result; an asynchronous copy or slice
    counted at its start, as its result read and written)."""
    entry = hlo_text[hlo_text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}\n")] if "\n}\n" in entry else entry
    shapes: dict[str, tuple[int, int]] = {}
    by_scope: collections.Counter = collections.Counter()
    by_opcode: collections.Counter = collections.Counter()
    other_memory = 0
    for line in entry.splitlines()[1:]:
        m = _NAMED.match(line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        shapes[name] = _shape_bytes(shape)
        if opcode in _NO_TRAFFIC or _ASYNC_DONE.search(opcode):
            continue
        if opcode.endswith("-start"):  # moves its result: read, then written
            moved = _shape_bytes(_result_shape(shape, opcode))
            main, other = 2 * moved[0], 2 * moved[1]
        else:
            args = rest.split("), ", 1)[0]
            operands = [shapes.get(o, (0, 0)) for o in _OPERAND.findall(args)]
            main = shapes[name][0] + sum(o[0] for o in operands)
            other = shapes[name][1] + sum(o[1] for o in operands)
        other_memory += other
        op_name = _OP_NAME.search(rest)
        by_scope[scope_of(op_name.group(1)) if op_name else "(no name)"] += main
        by_opcode[opcode] += main
    return {"by_scope": dict(by_scope), "by_opcode": dict(by_opcode), "other_memory": other_memory}
