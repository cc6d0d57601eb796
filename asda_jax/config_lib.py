"""From an ml_collections config to typed, validated pieces, before anything compiles.

A run's config (``configs/*.py``) has these blocks:

    task          "pretrain" | "finetune" | "linear_probe"
    model         a preset name plus ModelConfig overrides
    mask          MaskConfig (pretraining)
    pretrain      PretrainConfig (pretraining)
    data          InputConfig of the training split (eval_data: of the evaluation split)
    optim         OptimConfig
    mesh          sizes of the (data, fsdp, tensor) axes, one may be -1; mesh_dcn for
                  multi-slice TPU (sizes across slices)
    num_processes hosts the run expects (None: any)
    and the loop's knobs: seed, num_train_steps, log_every, checkpoint_every, ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import ml_collections

from asda_jax import masking, objectives, optim, sharding
from asda_jax import model as model_lib
from asda_jax.data import datasets, pipeline

TASKS = ("pretrain", "finetune", "linear_probe")


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    """A platform's mesh: sizes within a slice, across slices (multi-slice), hosts."""

    mesh: dict
    processes: int | None
    dcn: dict | None = None
    dtype: str = "bfloat16"
    fbank_on: str = "device"
    batch_size: int | None = None  # when the recipe's 48 clips do not divide over the hosts


def _data_parallel() -> dict:
    return {"data": -1, "fsdp": 1, "tensor": 1}


MESH_PRESETS = {
    "cpu": MeshPreset(_data_parallel(), 1, dtype="float32", fbank_on="host"),
    "gpu": MeshPreset(_data_parallel(), 1),  # 1–8 GPUs in one box
    "gpu_fsdp": MeshPreset({"data": 1, "fsdp": -1, "tensor": 1}, 1),
    "v4-8": MeshPreset(_data_parallel(), 1),  # 4 chips, 1 host
    "v4-32": MeshPreset(_data_parallel(), 4),  # 16 chips, 4 hosts
    "v5e-8": MeshPreset(_data_parallel(), 1),
    "v5e-32": MeshPreset(_data_parallel(), 8),
    "v5e-256": MeshPreset(_data_parallel(), 64, batch_size=64),
    "v5p-128": MeshPreset(_data_parallel(), 16),
    "2x-v5e-256": MeshPreset(_data_parallel(), 128, dcn={"data": 2}, batch_size=128),
}


def mesh_preset(name: str) -> MeshPreset:
    if name not in MESH_PRESETS:
        raise ConfigError(f"unknown mesh preset {name!r}; one of {sorted(MESH_PRESETS)}")
    return MESH_PRESETS[name]


class ConfigError(ValueError):
    """A config that cannot run as it is; raised before anything compiles."""


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"preset=tiny,mesh=cpu"`` → {"preset": "tiny", "mesh": "cpu"} (get_config's arg)."""
    if not arg:
        return {}
    pairs = [item.split("=", 1) for item in arg.split(",") if item]
    bad = [p[0] for p in pairs if len(p) != 2]
    if bad:
        raise ConfigError(f"config arguments must be key=value, got {bad}")
    return {k.strip(): v.strip() for k, v in pairs}


def dataclass_fields(cls, block: ml_collections.ConfigDict | dict, exclude: Sequence[str] = ()):
    values = dict(block)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names - set(exclude))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}


def model_config(config) -> model_lib.ModelConfig:
    block = dict(config.model)
    preset = block.pop("preset", "base")
    try:
        return model_lib.preset(preset, **dataclass_fields(model_lib.ModelConfig, block))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def mask_config(config) -> masking.MaskConfig:
    return masking.MaskConfig(**dataclass_fields(masking.MaskConfig, config.mask))


def pretrain_config(config) -> objectives.PretrainConfig:
    return objectives.PretrainConfig(**dataclass_fields(objectives.PretrainConfig, config.pretrain))


def input_config(config, block: str = "data") -> pipeline.InputConfig:
    return pipeline.InputConfig(**dataclass_fields(pipeline.InputConfig, config[block]))


def optim_config(config) -> optim.OptimConfig:
    cfg = optim.OptimConfig(**dataclass_fields(optim.OptimConfig, config.optim))
    try:
        return cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e


def validate(config, *, device_count: int, process_count: int) -> None:
    """Every check that can fail before compiling, each with a message naming the fix."""
    if config.task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {config.task!r}")
    expected = config.get("num_processes")
    if expected is not None and expected != process_count:
        raise ConfigError(
            f"config expects {expected} processes but JAX sees {process_count}: on a multi-host "
            "pod every host must run this command (jax.distributed.initialize joins them); "
            "set --config.num_processes to match"
        )
    model_cfg = model_config(config)
    dcn = dict(config.get("mesh_dcn") or {})
    slices = math.prod(dcn.values()) if dcn else 1
    try:
        data_size, fsdp, tensor = sharding.resolve_mesh_shape(
            dict(config.mesh), device_count // slices
        )
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from e
    data_parallel = data_size * fsdp * dcn.get("data", 1) * dcn.get("fsdp", 1)
    data = input_config(config)
    rows = data.batch_size * (config.mask.clone_batch if config.task == "pretrain" else 1)
    if data.batch_size % process_count or rows % data_parallel:
        raise ConfigError(
            f"data.batch_size {data.batch_size} must divide over {process_count} hosts and "
            f"its {rows} rows over the {data_parallel}-way data-parallel mesh"
        )
    if data.target_frames % model_cfg.patch_size:
        raise ConfigError(
            f"data.target_frames {data.target_frames} is not a multiple of the patch size "
            f"{model_cfg.patch_size}"
        )
    for what, size, axis, width in (
        ("embed_dim", model_cfg.embed_dim, "fsdp", fsdp),
        ("num_heads", model_cfg.num_heads, "tensor", tensor),
        ("mlp width", model_cfg.mlp_dim, "tensor", tensor),
    ):
        if size % width:
            raise ConfigError(f"model {what} {size} does not split over mesh axis {axis}={width}")
    for block in ("data", "eval_data"):
        if block in config and config[block] is not None:
            _require_dataset(input_config(config, block))
    if config.task != "pretrain":
        _validate_finetune(config)
    if config.task == "pretrain":
        top_k = config.pretrain.get("average_top_k_layers", 12)
        if not 0 < top_k <= model_cfg.depth:
            raise ConfigError(
                f"pretrain.average_top_k_layers {top_k} must be in 1..{model_cfg.depth}"
            )
    optim_config(config)


def _validate_finetune(config) -> None:
    from asda_jax import checkpoints, finetune  # they build on this module

    cfg = finetune.finetune_config(config)
    if cfg.init_from:
        try:
            checkpoints.locate_params(cfg.init_from)
        except checkpoints.CheckpointMismatch as e:
            raise ConfigError(f"finetune.init_from: {e}") from e


def _require_dataset(data: pipeline.InputConfig) -> None:
    try:
        dataset = datasets.load(data.dataset, data.data_dir)
    except datasets.DatasetNotFoundError as e:
        raise ConfigError(str(e)) from e
    try:
        dataset.source(data.split)
    except ValueError as e:
        raise ConfigError(str(e)) from e
