"""Run configs: building them from defaults, and turning them into typed, validated blocks.

A run's config (``configs/*.py``, each starting from ``run_config``) holds every field
of the dataclass each block becomes, at its default unless the config says otherwise,
so any field can be overridden as ``--config.<block>.<field>=value``:

    task             "pretrain" | "finetune" | "linear_probe"
    model            a preset name; ModelConfig fields left None take the preset's value
    execution        model.Execution: compute dtype, remat, attention kernel, conv form
    mask, pretrain   MaskConfig, PretrainConfig (pretraining)
    finetune         FinetuneConfig (fine-tuning and linear probing)
    data, eval_data  InputConfig of the training and the evaluation split
    optim            OptimConfig; its schedule spans num_train_steps unless decay_steps
                     says otherwise
    mesh, mesh_dcn, num_processes   sizes of the (data, fsdp, tensor) axes (one may be
                     -1), sizes across slices (multi-slice TPU), hosts expected (None: any)
    topology         the chips the mesh preset is for ("v5e:2x4"): launch/compile.py's default
    and the loop's knobs: seed, num_train_steps, log_every, checkpoint_every, ...

``model`` is the architecture: it travels with checkpoints and exports. ``execution``
and ``data.fbank_on`` are how this run computes; their "auto" values are resolved here
for the platform of the devices in use (``platforms.py``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence

import ml_collections
from absl import logging
from ml_collections import config_dict

from asda_jax import checkpoints, masking, objectives, optim, platforms, sharding
from asda_jax import model as model_lib
from asda_jax.data import datasets, pipeline

TASKS = ("pretrain", "finetune", "linear_probe")
EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(model_lib.Execution))


class ConfigError(ValueError):
    """A config that cannot run as it is; raised before anything compiles."""


@dataclasses.dataclass(frozen=True)
class MeshPreset:
    """A deployment: its mesh within a slice and across slices, its hosts, and the
    topology it is (``launch/compile.py`` compiles for it; None: any device count)."""

    mesh: dict
    processes: int | None
    topology: str | None = None  # "v5e:2x4": chip and chip grid; GPUs as "h100:1x1x8"
    dcn: dict | None = None
    execution: dict | None = None  # the chips' overrides of the platform's forms

    @property
    def chips(self) -> int | None:
        """Devices of the whole deployment (every slice), where the topology says."""
        if self.topology is None:
            return None
        grid = self.topology.split(":", 1)[1]
        slices = math.prod((self.dcn or {}).values()) if self.dcn else 1
        return math.prod(int(n) for n in grid.split("x")) * slices

    def batch_for(self, recipe_batch: int) -> int:
        """The recipe's batch where it splits into whole clips over every chip and host,
        else the next multiple of the chips (the rest of the recipe unchanged)."""
        step = math.lcm(self.chips or 1, self.processes or 1)
        return -(-recipe_batch // step) * step


# v4's 16 MiB of VMEM cannot hold the MLP kernel's weights and their gradients.
V4 = types.MappingProxyType({"mlp_impl": "xla"})
MESH_PRESETS = {
    "cpu": MeshPreset(sharding.DATA_PARALLEL, 1),
    "gpu": MeshPreset(sharding.DATA_PARALLEL, 1),  # 1–8 GPUs in one box
    "gpu_fsdp": MeshPreset({"data": 1, "fsdp": -1, "tensor": 1}, 1),
    "v4-8": MeshPreset(sharding.DATA_PARALLEL, 1, "v4:2x2x1", execution=V4),  # 4 chips, 1 host
    "v4-32": MeshPreset(sharding.DATA_PARALLEL, 4, "v4:2x2x4", execution=V4),  # 16 chips, 4 hosts
    "v5e-8": MeshPreset(sharding.DATA_PARALLEL, 1, "v5e:2x4"),
    "v5e-32": MeshPreset(sharding.DATA_PARALLEL, 8, "v5e:4x8"),
    "v5e-256": MeshPreset(sharding.DATA_PARALLEL, 64, "v5e:16x16"),
    "v5p-128": MeshPreset(sharding.DATA_PARALLEL, 16, "v5p:4x4x4"),  # 64 chips
    "2x-v5e-256": MeshPreset(sharding.DATA_PARALLEL, 128, "v5e:16x16", dcn={"data": 2}),
}
GPU_TOPOLOGY = "h100:1x1x8"  # what launch/compile.py compiles the gpu presets for


def mesh_preset(name: str) -> MeshPreset:
    if name not in MESH_PRESETS:
        raise ConfigError(f"unknown mesh preset {name!r}; one of {sorted(MESH_PRESETS)}")
    return MESH_PRESETS[name]


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"model=tiny,mesh=cpu"`` → {"model": "tiny", "mesh": "cpu"} (get_config's arg)."""
    if not arg:
        return {}
    pairs = [item.split("=", 1) for item in arg.split(",") if item]
    bad = [p[0] for p in pairs if len(p) != 2]
    if bad:
        raise ConfigError(f"config arguments must be key=value, got {bad}")
    return {k.strip(): v.strip() for k, v in pairs}


# ---------------------------------------------------------------------------- building


def _override_type(hint) -> type:
    """The type a command-line override of a field annotated ``hint`` parses to:
    ``X | None`` as X, ``tuple[...]`` as tuple."""
    if isinstance(hint, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return typing.get_origin(hint) or hint


def block(cls, *, exclude: Sequence[str] = (), **overrides) -> ml_collections.ConfigDict:
    """Every field of the dataclass ``cls`` at its default, then ``overrides``; a field
    whose value is None is a typed placeholder, so it can still be set from the flags."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(overrides) - set(hints))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}")
    values = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in exclude}
    values |= overrides
    return ml_collections.ConfigDict(
        {
            name: config_dict.placeholder(_override_type(hints[name])) if value is None else value
            for name, value in values.items()
        }
    )


def model_block(preset: str = "base", **overrides) -> ml_collections.ConfigDict:
    """A preset name and every ModelConfig field, None (the preset's value) unless given."""
    fields = {f.name: None for f in dataclasses.fields(model_lib.ModelConfig)}
    config = block(model_lib.ModelConfig, **(fields | overrides))
    config.preset = preset
    return config


def run_config(
    task: str, *, model: str = "base", mesh: str = "cpu", batch_size: int = 8
) -> ml_collections.ConfigDict:
    """A run's config with every block at its defaults, for a model preset, a mesh preset
    and a global batch (rounded up to whole clips per chip where the preset's chips do
    not divide it: ``MeshPreset.batch_for``); configs/*.py change what differs."""
    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    preset = mesh_preset(mesh)
    config = ml_collections.ConfigDict()
    config.task = task
    config.model = model_block(model)
    config.execution = block(model_lib.Execution, exclude=("platform",))
    config.execution.update(dict(preset.execution or {}))
    if task == "pretrain":
        config.mask = block(masking.MaskConfig)
        config.pretrain = block(objectives.PretrainConfig)
    else:
        config.finetune = block(objectives.FinetuneConfig)
    config.data = block(pipeline.InputConfig, batch_size=preset.batch_for(batch_size))
    config.eval_data = None
    config.optim = block(optim.OptimConfig)
    config.mesh = dict(preset.mesh)
    config.mesh_dcn = preset.dcn
    config.num_processes = preset.processes
    config.topology = preset.topology or (GPU_TOPOLOGY if mesh.startswith("gpu") else None)
    config.seed = 0
    config.num_train_steps = 1000
    config.log_every = 100
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.profile_steps = 0
    config.probe = None
    return config


# ---------------------------------------------------------------------------- reading


def dataclass_fields(cls, values, *, exclude: Sequence[str] = ()) -> dict:
    """The entries of ``values`` that are fields of ``cls`` (lists as tuples); an entry
    that is neither a field nor excluded is an error naming the known fields."""
    values = dict(values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names - set(exclude))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}


def architecture(fields: dict) -> model_lib.ModelConfig:
    """The ModelConfig of a preset name and field values (None: the preset's); execution
    settings among them are an error naming their place."""
    fields = {k: v for k, v in fields.items() if v is not None}
    preset = fields.pop("preset", "base")
    misplaced = sorted(set(fields) & set(EXECUTION_FIELDS))
    if misplaced:
        names = ", ".join(f"model.{name}" for name in misplaced)
        raise ConfigError(f"{names}: execution settings, not architecture; set execution.<name>")
    try:
        return model_lib.preset(preset, **dataclass_fields(model_lib.ModelConfig, fields))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def without_execution(fields: dict, where: str) -> dict:
    """A saved model description without the execution settings that versions before
    their move kept in it: ignored, with a note (what loads it computes in its own
    platform's defaults)."""
    legacy = sorted(set(fields) & set(EXECUTION_FIELDS))
    if legacy:
        logging.info("%s: ignoring its execution settings %s", where, legacy)
    return {k: v for k, v in fields.items() if k not in legacy}


def saved_run_config(saved: dict, where: str) -> ml_collections.ConfigDict:
    """A run's config as launch/train.py saved it (``config.json``), in today's layout."""
    config = ml_collections.ConfigDict(saved)
    config.model = without_execution(dict(config.model), where)
    return config


def model_config(config) -> model_lib.ModelConfig:
    return architecture(dict(config.model))


def execution(config, platform: str) -> model_lib.Execution:
    """How this run's model computes on devices of ``platform`` (that of the devices in
    use: never a setting)."""
    fields = dataclass_fields(model_lib.Execution, config.get("execution") or {})
    if "platform" in fields:
        raise ConfigError("execution.platform is the devices' platform, not a setting")
    try:
        return model_lib.Execution(platform=platform, **fields).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e


def mask_config(config) -> masking.MaskConfig:
    return masking.MaskConfig(**dataclass_fields(masking.MaskConfig, config.mask))


def pretrain_config(config) -> objectives.PretrainConfig:
    return objectives.PretrainConfig(**dataclass_fields(objectives.PretrainConfig, config.pretrain))


def finetune_config(config) -> objectives.FinetuneConfig:
    fields = dataclass_fields(objectives.FinetuneConfig, config.get("finetune") or {})
    try:
        return objectives.FinetuneConfig(**fields).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e


def input_config(config, block: str = "data", *, platform: str) -> pipeline.InputConfig:
    """The InputConfig of ``config[block]``, its "auto" front end placed for ``platform``."""
    cfg = pipeline.InputConfig(**dataclass_fields(pipeline.InputConfig, config[block]))
    if cfg.fbank_on == "auto":
        cfg = dataclasses.replace(cfg, fbank_on=platforms.forms(platform).fbank_on)
    return cfg


def optim_config(config) -> optim.OptimConfig:
    """The OptimConfig with its schedule length resolved: ``num_train_steps``, unless
    ``optim.decay_steps`` sets another explicitly (not one that ends before the run)."""
    fields = dataclass_fields(optim.OptimConfig, config.optim, exclude=("total_steps",))
    steps = config.num_train_steps
    legacy = config.optim.get("total_steps")
    if legacy is not None and legacy != steps:
        raise ConfigError(
            f"optim.total_steps ({legacy}) disagrees with num_train_steps ({steps}): the "
            "schedule now follows num_train_steps; drop optim.total_steps, or set "
            "optim.decay_steps to decay over another length"
        )
    if fields.get("decay_steps") is not None and fields["decay_steps"] < steps:
        raise ConfigError(
            f"optim.decay_steps ({fields['decay_steps']}) ends before the run's "
            f"num_train_steps ({steps}): its last steps would train at optim.min_lr; "
            "unset optim.decay_steps to decay over the run"
        )
    cfg = optim.OptimConfig(**fields)
    if cfg.decay_steps is None:
        cfg = dataclasses.replace(cfg, decay_steps=steps)
    try:
        return cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e


# ---------------------------------------------------------------------------- validating


def validate(
    config, *, device_count: int, process_count: int, platform: str, require_files: bool = True
) -> None:
    """Every check that can fail before compiling, each with a message naming the fix;
    ``require_files=False`` leaves out the datasets and the checkpoint to start from
    (compiling ahead of time needs neither)."""
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
    execution(config, platform)
    optim_config(config)
    data = input_config(config, platform=platform)
    _validate_mesh(config, model_cfg, data, device_count, process_count)
    if data.target_frames % model_cfg.patch_size:
        raise ConfigError(
            f"data.target_frames {data.target_frames} is not a multiple of the patch size "
            f"{model_cfg.patch_size}"
        )
    for name in ("data", "eval_data"):
        if require_files and config.get(name) is not None:
            _require_dataset(input_config(config, name, platform=platform))
    if config.task == "pretrain":
        _validate_pretraining(config, model_cfg)
    else:
        _validate_finetuning(config, require_files)


def _validate_mesh(config, model_cfg, data, device_count: int, process_count: int) -> None:
    """The mesh fits the devices, the batch splits over it, the model over its axes."""
    dcn = dict(config.get("mesh_dcn") or {})
    slices = math.prod(dcn.values()) if dcn else 1
    try:
        data_size, fsdp, tensor = sharding.resolve_mesh_shape(
            dict(config.mesh), device_count // slices
        )
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from e
    data_parallel = data_size * fsdp * dcn.get("data", 1) * dcn.get("fsdp", 1)
    if data.batch_size % process_count or data.batch_size % data_parallel:
        raise ConfigError(
            f"data.batch_size {data.batch_size} clips must divide over {process_count} hosts "
            f"and over the {data_parallel}-way data-parallel mesh (every device takes whole "
            f"clips); use a multiple of {math.lcm(process_count, data_parallel)}"
        )
    for what, size, axis, width in (
        ("embed_dim", model_cfg.embed_dim, "fsdp", fsdp),
        ("num_heads", model_cfg.num_heads, "tensor", tensor),
        ("mlp width", model_cfg.mlp_dim, "tensor", tensor),
    ):
        if size % width:
            raise ConfigError(f"model {what} {size} does not split over mesh axis {axis}={width}")


def _validate_pretraining(config, model_cfg: model_lib.ModelConfig) -> None:
    top_k = pretrain_config(config).average_top_k_layers
    if not 0 < top_k <= model_cfg.depth:
        raise ConfigError(f"pretrain.average_top_k_layers {top_k} must be in 1..{model_cfg.depth}")


def _validate_finetuning(config, require_files: bool) -> None:
    cfg = finetune_config(config)
    if require_files and cfg.init_from:
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
