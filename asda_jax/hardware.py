"""Every fact about hardware the project uses, one row per chip, and the deployments.

A *chip* is what JAX reports as a device's ``device_kind`` ("TPU v5 lite", "NVIDIA H100
80GB HBM3", "cpu"). The chip, not the platform, decides what a program can do there:
its VMEM bounds a kernel's blocks, megacore joins two TensorCores into one device, and
its published figures make a compiled program's roofline. Each row of ``CHIPS`` holds

- the published figures: dense bfloat16 peak, HBM size and bandwidth, VMEM per
  TensorCore (as JAX's Pallas TPU info gives it), and what a kernel may ask of it;
- how JAX shows it: devices per chip, megacore;
- the forms the project computes in there (``Forms``): compute dtype, where the fbank
  runs, the decoder's and the MLP's forms, and which attention backend ``auto`` takes
  (``AttentionRule``);
- for GPUs, what the CUDA compiler needs to compile for a chip it does not see.

A device kind that is not in the table takes its platform's generic row ("tpu",
"gpu"), whose forms ask nothing of the chip that the smallest supported one lacks.
Code chooses by the devices a program is for (``of_devices``), never by
``jax.default_backend()``, which names only where Python runs: a program compiled on a
CPU host for TPU devices must take the TPU's forms.

``MESH_PRESETS`` are the deployments a config names (``mesh=v5e-8``): a mesh within a
slice and across slices, the hosts, and the topology of chips it is for.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from asda_jax import sharding

PLATFORMS = ("cpu", "gpu", "tpu")
GPU_PLATFORMS = ("gpu", "cuda", "rocm")  # jax.Device.platform of a GPU
LANES = 128  # a TPU vector register's lanes, hence Mosaic's block widths (every generation)
GiB = 1024**3
MiB = 1024**2


@dataclasses.dataclass(frozen=True)
class Forms:
    """The forms a chip's programs compute in. Each is a choice between forms that give
    the same numbers; the plain one is the reference the tests hold the others to."""

    compute_dtype: str  # the model's compute dtype unless a run sets one
    fbank_on: str  # where the input pipeline's spectrograms are computed: "host" | "device"
    preemphasis: str  # device front end: "plain" | "conv" (a two-tap convolution)
    mel: str  # front end's mel energies: "dense" (one product) | "bands" (of the sparse bank)
    frames_per_pass: int | None  # device front end: frames a pass transforms (None: all)
    decoder_conv: str  # decoder's block: "xla" | "per_device" | "taps" (k² matmuls) | "pallas"
    mlp: str  # the encoder blocks' MLP: "xla" | "pallas" (one kernel, the hidden layer in VMEM)
    windows_per_call: int  # the tools' windows of long audio encoded per call


@dataclasses.dataclass(frozen=True)
class AttentionRule:
    """The backend ``attention_impl="auto"`` takes on a chip: ``long`` from ``long_from``
    tokens, below that ``short`` for differential attention and ``xla`` for plain; a
    backend that cannot run a call (dtype, head width) gives way to ``xla``."""

    long: str = "xla"
    long_from: int = 0
    short: str = "xla"
    max_head_dim: int | None = None  # cuDNN's fused attention: the widest head it takes


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """What the CUDA compiler needs of a GPU it does not see (stream_executor's
    GpuTargetConfigProto), from the chip's published figures."""

    compute_capability: tuple[int, int]
    cores: int
    fpus_per_core: int
    clock_ghz: float
    memory_bytes: int
    bandwidth: int  # bytes/s
    l2_bytes: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # short name, the prefix of its topologies ("v5e" in "v5e:2x4")
    platform: str  # "cpu" | "gpu" | "tpu"
    device_kinds: tuple[str, ...]  # as JAX reports them
    forms: Forms
    attention: AttentionRule = AttentionRule()
    peak_flops: float | None = None  # FLOP/s, dense bfloat16
    hbm_bytes: int | None = None
    hbm_bandwidth: float | None = None  # bytes/s
    vmem_bytes: int | None = None  # per TensorCore
    # What a Pallas kernel may ask for (``vmem_limit_bytes``); the rest of VMEM is the
    # compiler's own to use around the kernels.
    kernel_vmem_bytes: int | None = None
    megacore: bool = False  # two TensorCores shown as one device
    # Devices JAX shows per chip: 2 where each TensorCore is its own device (Ironwood).
    # The figures above are then per device, the published per-chip figures halved.
    devices_per_chip: int = 1
    chips_per_host: int | None = None  # TPU: the most chips one host (a TPU VM) holds
    gpu_target: GpuTarget | None = None
    source: str = ""  # where the figures are published

    @property
    def description(self) -> str:
        return self.device_kinds[0] if self.device_kinds else f"a {self.platform} chip"

    @property
    def cores_per_device(self) -> int:
        """TensorCores behind one device: a kernel's "parallel" grid axes are split over
        them (Mosaic's megacore), its "arbitrary" ones run on one."""
        return 2 if self.megacore else 1

    def topology_options(self, grid: tuple[int, ...]) -> dict:
        """libtpu's description of a ``grid`` of this chip's chips as a TPU VM shows them:
        one device per megacore chip (libtpu would count each TensorCore), and a grid
        that one host holds on one host (libtpu's default hosts are 2x2x1, which a
        single chip or an 8-chip VM does not divide into)."""
        options: dict = {"chip_config_name": "megacore"} if self.megacore else {}
        if self.chips_per_host and math.prod(grid) <= self.chips_per_host:
            options["chips_per_host_bounds"] = (*grid, 1, 1)[:3]
        return options


PLAIN = Forms(
    compute_dtype="bfloat16",
    fbank_on="device",
    preemphasis="plain",
    mel="dense",
    frames_per_pass=None,
    decoder_conv="xla",
    mlp="xla",
    windows_per_call=32,
)
# XLA CPU fuses the pre-emphasis as a convolution in one pass; its FFT slows once a
# pass's frames outgrow the cache; its grouped-convolution gradient is slow; one window
# per call keeps the encoder's activations in cache (docs/decisions.md).
CPU_FORMS = Forms(
    compute_dtype="float32",
    fbank_on="host",
    preemphasis="conv",
    mel="bands",
    frames_per_pass=4096,
    decoder_conv="taps",
    mlp="xla",
    windows_per_call=1,
)
# The GPU partitioner all-gathers the batch around a grouped convolution unless each
# device convolves its own examples (model.decoder.grouped_conv).
GPU_FORMS = dataclasses.replace(PLAIN, decoder_conv="per_device")
# The decoder's blocks and the encoder's MLPs as Pallas kernels (asda_jax/kernels/).
TPU_FORMS = dataclasses.replace(PLAIN, decoder_conv="pallas", mlp="pallas")
# The MLP kernel holds both weight matrices and their float32 gradients in VMEM.
TPU_SMALL_VMEM_FORMS = dataclasses.replace(TPU_FORMS, mlp="xla")

TPU_ATTENTION = AttentionRule(long="pallas_splash", long_from=LANES, short="pallas_short")
HOPPER_ATTENTION = AttentionRule(long="cudnn", max_head_dim=256)
GPU_ATTENTION = AttentionRule(long="cudnn", max_head_dim=128)

CHIPS = {
    c.name: c
    for c in (
        Chip("cpu", "cpu", ("cpu",), CPU_FORMS),
        # A GPU of a kind not listed: the GPU forms, no published figures.
        Chip("gpu", "gpu", (), GPU_FORMS, GPU_ATTENTION),
        # A TPU of a kind not listed: the kernels that fit the smallest VMEM listed.
        Chip(
            "tpu", "tpu", (), TPU_SMALL_VMEM_FORMS, TPU_ATTENTION, vmem_bytes=16 * MiB,
            kernel_vmem_bytes=16 * MiB,
        ),
        Chip(
            "v4", "tpu", ("TPU v4",), TPU_SMALL_VMEM_FORMS, TPU_ATTENTION,
            peak_flops=275e12, hbm_bytes=32 * GiB, hbm_bandwidth=1228e9, vmem_bytes=16 * MiB,
            kernel_vmem_bytes=16 * MiB, megacore=True, chips_per_host=4,
            source="cloud.google.com/tpu/docs/v4",
        ),
        Chip(
            "v5e", "tpu", ("TPU v5 lite", "TPU v5e"), TPU_FORMS, TPU_ATTENTION,
            peak_flops=197e12, hbm_bytes=16 * GiB, hbm_bandwidth=819e9, vmem_bytes=128 * MiB,
            kernel_vmem_bytes=100 * MiB, chips_per_host=8, source="cloud.google.com/tpu/docs/v5e",
        ),
        Chip(
            "v5p", "tpu", ("TPU v5", "TPU v5p"), TPU_FORMS, TPU_ATTENTION,
            peak_flops=459e12, hbm_bytes=95 * GiB, hbm_bandwidth=2765e9, vmem_bytes=64 * MiB,
            kernel_vmem_bytes=64 * MiB, megacore=True, chips_per_host=4,
            source="cloud.google.com/tpu/docs/v5p",
        ),
        Chip(
            "v6e", "tpu", ("TPU v6 lite", "TPU v6e"), TPU_FORMS, TPU_ATTENTION,
            peak_flops=918e12, hbm_bytes=32 * GiB, hbm_bandwidth=1640e9, vmem_bytes=128 * MiB,
            kernel_vmem_bytes=100 * MiB, chips_per_host=8, source="cloud.google.com/tpu/docs/v6e",
        ),
        # Ironwood: each of a chip's two TensorCores is a device of its own (no
        # megacore), so the row's figures are half the chip's 2 307 TFLOP/s, 192 GB, 7.37 TB/s.
        Chip(
            "tpu7x", "tpu", ("TPU7x",), TPU_FORMS, TPU_ATTENTION,
            peak_flops=2307e12 / 2, hbm_bytes=192 * 10**9 // 2, hbm_bandwidth=7.37e12 / 2,
            vmem_bytes=64 * MiB, kernel_vmem_bytes=64 * MiB, devices_per_chip=2,
            chips_per_host=4, source="cloud.google.com/tpu/docs/tpu7x",
        ),
        Chip(
            "h100", "gpu", ("NVIDIA H100 80GB HBM3",), GPU_FORMS, HOPPER_ATTENTION,
            peak_flops=989e12, hbm_bytes=80 * 10**9, hbm_bandwidth=3.35e12,
            gpu_target=GpuTarget(
                (9, 0), cores=132, fpus_per_core=128, clock_ghz=1.98, memory_bytes=84_978_434_048,
                bandwidth=3_352_320_000_000, l2_bytes=52_428_800,
                shared_memory_per_core=233_472, shared_memory_per_block_optin=232_448,
            ),
            source="nvidia.com/en-us/data-center/h100 (datasheet, SXM, dense BF16)",
        ),
        Chip(
            "h200", "gpu", ("NVIDIA H200",), GPU_FORMS, HOPPER_ATTENTION,
            peak_flops=989e12, hbm_bytes=141 * 10**9, hbm_bandwidth=4.8e12,
            gpu_target=GpuTarget(
                (9, 0), cores=132, fpus_per_core=128, clock_ghz=1.98,
                memory_bytes=150_754_820_096, bandwidth=4_800_000_000_000, l2_bytes=52_428_800,
                shared_memory_per_core=233_472, shared_memory_per_block_optin=232_448,
            ),
            source="nvidia.com/en-us/data-center/h200 (datasheet, SXM, dense BF16)",
        ),
        Chip(
            "b200", "gpu", ("NVIDIA B200",), GPU_FORMS, HOPPER_ATTENTION,
            peak_flops=2.25e15, hbm_bytes=180 * 10**9, hbm_bandwidth=7.7e12,
            gpu_target=GpuTarget(
                (10, 0), cores=148, fpus_per_core=128, clock_ghz=1.965,
                memory_bytes=180 * 10**9, bandwidth=7_700_000_000_000, l2_bytes=132_120_576,
                shared_memory_per_core=233_472, shared_memory_per_block_optin=232_448,
            ),
            source="nvidia.com/en-us/data-center/hgx (HGX B200 datasheet, dense BF16)",
        ),
        Chip(
            "a100", "gpu", ("NVIDIA A100-SXM4-80GB",), GPU_FORMS, GPU_ATTENTION,
            peak_flops=312e12, hbm_bytes=80 * 10**9, hbm_bandwidth=2.039e12,
            gpu_target=GpuTarget(
                (8, 0), cores=108, fpus_per_core=64, clock_ghz=1.41, memory_bytes=85_899_345_920,
                bandwidth=2_039_000_000_000, l2_bytes=41_943_040,
                shared_memory_per_core=167_936, shared_memory_per_block_optin=166_912,
            ),
            source="nvidia.com/en-us/data-center/a100 (datasheet, SXM, dense BF16)",
        ),
    )
}  # fmt: skip
HOST = CHIPS["cpu"]  # the input pipeline's NumPy front end runs on the host's CPU


def chip(name: str) -> Chip:
    """The row of a chip's short name ("v5e", "h100", "cpu"; "tpu"/"gpu": generic)."""
    if name not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; one of {sorted(CHIPS)}")
    return CHIPS[name]


def platform_of(device) -> str:
    """ "cpu", "gpu" or "tpu" of a device, real or abstract."""
    platform = "gpu" if device.platform in GPU_PLATFORMS else device.platform
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {device.platform!r}; one of {PLATFORMS}")
    return platform


def of_kind(device_kind: str, platform: str) -> Chip:
    """The row of a device kind, else its platform's generic row."""
    for row in CHIPS.values():
        if device_kind in row.device_kinds:
            return row
    return CHIPS[platform]


def of_devices(devices: Iterable) -> Chip:
    """The chip of ``devices`` (real or abstract), which must all be of one kind."""
    kinds = {(d.device_kind, platform_of(d)) for d in devices}
    if len(kinds) != 1:
        raise ValueError(f"expected devices of one kind, got {sorted(kinds) or 'none'}")
    ((kind, platform),) = kinds
    return of_kind(kind, platform)


def of_mesh(mesh) -> Chip:
    return of_devices(mesh.devices.flat)


def chip_grid(topology: str) -> tuple[int, ...]:
    """The chips along each axis of a topology: "v5e:2x4" → (2, 4)."""
    _, _, grid = topology.partition(":")
    try:
        return tuple(int(n) for n in grid.split("x"))
    except ValueError:
        raise ValueError(f"topology {topology!r} is not chip:AxB[xC]") from None


def of_topology(topology: str) -> Chip:
    """The chip of a topology name: "v5e:2x4" → v5e, "h100:1x1x8" → h100."""
    name = topology.split(":")[0]
    row = CHIPS.get(name)
    if row is None or not row.device_kinds or row.platform == "cpu":
        known = sorted(n for n, c in CHIPS.items() if c.device_kinds and c.platform != "cpu")
        raise ValueError(f"unknown chip in topology {topology!r}; one of {known}")
    return row


# ---------------------------------------------------------------------------- deployments


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    """A deployment: its mesh within a slice and across slices, its hosts, and the
    topology it is (None: any number of devices of its ``platform``)."""

    platform: str
    mesh: dict
    processes: int | None
    topology: str | None = None  # "v5e:2x4": chip and chip grid; GPUs as "h100:1x1x8"
    dcn: dict | None = None
    # task -> Execution.remat_policy, where the task's recipe batch fits the chips' HBM
    # only with its blocks rematerialised (the numbers stay the same; the step does more)
    remat: dict = dataclasses.field(default_factory=dict)

    @property
    def devices(self) -> int | None:
        """Devices of the whole deployment (every slice), where the topology says."""
        if self.topology is None:
            return None
        slices = math.prod((self.dcn or {}).values()) if self.dcn else 1
        chip = of_topology(self.topology)
        return math.prod(chip_grid(self.topology)) * chip.devices_per_chip * slices

    @property
    def compile_topology(self) -> str | None:
        """What ``launch/compile.py`` compiles for: the topology, for a GPU box 8 H100s."""
        return self.topology or (GPU_TOPOLOGY if self.platform == "gpu" else None)

    def batch_for(self, recipe_batch: int) -> int:
        """The recipe's batch where it splits into whole clips over every device and host,
        else the next multiple of the devices (the rest of the recipe unchanged)."""
        step = math.lcm(self.devices or 1, self.processes or 1)
        return -(-recipe_batch // step) * step


GPU_TOPOLOGY = "h100:1x1x8"
DATA_PARALLEL = sharding.DATA_PARALLEL  # every device takes its own clips
MESH_PRESETS = {
    "cpu": MeshPreset("cpu", DATA_PARALLEL, 1),
    "gpu": MeshPreset("gpu", DATA_PARALLEL, 1),  # 1–8 GPUs in one box
    "gpu_fsdp": MeshPreset("gpu", {"data": 1, "fsdp": -1, "tensor": 1}, 1),
    "v4-8": MeshPreset("tpu", DATA_PARALLEL, 1, "v4:2x2x1"),  # 4 chips, 1 host
    "v4-32": MeshPreset("tpu", DATA_PARALLEL, 4, "v4:2x2x4"),  # 16 chips, 4 hosts
    "v5e-8": MeshPreset("tpu", DATA_PARALLEL, 1, "v5e:2x4"),
    "v5e-32": MeshPreset("tpu", DATA_PARALLEL, 8, "v5e:4x8"),
    "v5e-256": MeshPreset("tpu", DATA_PARALLEL, 64, "v5e:16x16"),
    "v5p-128": MeshPreset("tpu", DATA_PARALLEL, 16, "v5p:4x4x4"),  # 64 chips
    "v6e-8": MeshPreset("tpu", DATA_PARALLEL, 1, "v6e:2x4"),
    "v6e-256": MeshPreset("tpu", DATA_PARALLEL, 64, "v6e:16x16"),
    # Colab's single-chip TPUs
    # one v5e chip (16 GiB) holds base pretraining's 48 clips only with remat: without it
    # the step needs about 30 GB (as on one v6e chip)
    "v5e-1": MeshPreset("tpu", DATA_PARALLEL, 1, "v5e:1x1", remat={"pretrain": "full"}),
    "v6e-1": MeshPreset("tpu", DATA_PARALLEL, 1, "v6e:1x1"),
    # Ironwood, named by TensorCores (= devices) as v4's and v5p's slices are
    "tpu7x-8": MeshPreset("tpu", DATA_PARALLEL, 1, "tpu7x:2x2x1"),  # 4 chips, 1 host
    "tpu7x-128": MeshPreset("tpu", DATA_PARALLEL, 16, "tpu7x:4x4x4"),  # 64 chips, 16 hosts
    "2x-v5e-256": MeshPreset("tpu", DATA_PARALLEL, 128, "v5e:16x16", dcn={"data": 2}),
}


def mesh_preset(name: str) -> MeshPreset:
    if name not in MESH_PRESETS:
        raise ValueError(f"unknown mesh preset {name!r}; one of {sorted(MESH_PRESETS)}")
    return MESH_PRESETS[name]
