"""The one table of what each platform runs, chosen by the devices a program is for.

Every entry is a choice between forms that compute the same numbers; the plain form
is the reference the tests hold the fast ones to. Code chooses by the platform of the
devices in use (``of_mesh``, ``of_devices``), never by ``jax.default_backend()``,
which names only where Python runs: a program compiled on a CPU host for TPU devices
must take the TPU forms. Why each CPU form is faster there, with the measurements,
is in BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

PLATFORMS = ("cpu", "gpu", "tpu")
GPU_NAMES = ("gpu", "cuda", "rocm")  # jax.Device.platform of a GPU


@dataclasses.dataclass(frozen=True)
class Forms:
    """The forms one platform runs."""

    compute_dtype: str  # the model's compute dtype unless a run sets one
    fbank_on: str  # where the input pipeline's spectrograms are computed: "host" | "device"
    preemphasis: str  # device front end: "plain" | "conv" (a two-tap convolution)
    mel: str  # front end's mel energies: "dense" (one product) | "bands" (of the sparse bank)
    frames_per_pass: int | None  # device front end: frames a pass transforms (None: all)
    decoder_conv: str  # decoder's block: "xla" | "per_device" | "taps" (k² matmuls) | "pallas"
    mlp: str  # the encoder blocks' MLP: "xla" | "pallas" (one kernel, the hidden layer in VMEM)
    windows_per_call: int  # the tools' windows of long audio encoded per call


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
FORMS = {
    # XLA CPU fuses the pre-emphasis as a convolution in one pass; its FFT slows once a
    # pass's frames outgrow the cache; its grouped-convolution gradient is slow; one
    # 10 s window per call keeps the encoder's activations in cache.
    "cpu": Forms(
        compute_dtype="float32",
        fbank_on="host",
        preemphasis="conv",
        mel="bands",
        frames_per_pass=4096,
        decoder_conv="taps",
        mlp="xla",
        windows_per_call=1,
    ),
    # The GPU partitioner all-gathers the batch around a grouped convolution (model.grouped_conv).
    "gpu": dataclasses.replace(PLAIN, decoder_conv="per_device"),
    # The decoder's blocks as one Pallas kernel each (decoder_kernel): compiled for v5e-8
    # the decoder accessed 4.9 GB per chip and step instead of XLA's 19.7.
    # And the encoder blocks' MLPs (mlp_kernel), whose weights it holds whole in VMEM:
    # the v4 mesh presets, 16 MiB of VMEM, keep XLA's (config_lib.MESH_PRESETS).
    "tpu": dataclasses.replace(PLAIN, decoder_conv="pallas", mlp="pallas"),
}
HOST = FORMS["cpu"]  # the input pipeline's NumPy front end runs on the host's CPU


def forms(platform: str) -> Forms:
    if platform not in FORMS:
        raise ValueError(f"unknown platform {platform!r}; one of {PLATFORMS}")
    return FORMS[platform]


def of_devices(devices: Iterable) -> str:
    """The platform ("cpu", "gpu" or "tpu") of ``devices``, real or abstract."""
    found = {"gpu" if d.platform in GPU_NAMES else d.platform for d in devices}
    if len(found) != 1:
        raise ValueError(f"expected devices of one platform, got {sorted(found) or 'none'}")
    (platform,) = found
    forms(platform)  # a platform this table knows
    return platform


def of_mesh(mesh) -> str:
    return of_devices(mesh.devices.flat)
