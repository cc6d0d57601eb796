"""Run configs: built from the blocks' defaults, read once into a typed ``RunConfig``.

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
    topology         the chips a mesh preset is for: launch/compile.py's default
    selfcheck        the run's kernels against their XLA forms first: "auto" | "on" |
                     "fastest" | "off" (asda_jax/selfcheck.py)
    and the loop's knobs: seed, num_train_steps, log_every, checkpoint_every, ...

``read`` turns it into a ``RunConfig`` for the chip of the devices in use, once: the
tasks, the loop and the compiler take that. ``model`` is the architecture: it travels
with checkpoints and exports. ``execution`` and ``data.fbank_on`` are how this run
computes; their "auto" values are resolved for the chip (``hardware.Chip.forms``).
Run configs and exports are not yet a stable format: one written by another version
may be refused.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections
from absl import logging
from ml_collections import config_dict

from asda_jax import checkpoints, hardware, masking, objectives, optim, sharding
from asda_jax import model as model_lib
from asda_jax.data import datasets, pipeline
from asda_jax.kernels import decoder as decoder_kernel
from asda_jax.kernels import mlp as mlp_kernel
from asda_jax.model import config as model_config

TASKS = ("pretrain", "finetune", "linear_probe")
# kernels checked against their XLA forms before a run (asda_jax/selfcheck.py): "auto"
# where they run compiled (TPU, GPU), "fastest" also drops a kernel slower than its form
SELFCHECK_MODES = ("auto", "on", "fastest", "off")
EXECUTION_FIELDS = tuple(f.name for f in dataclasses.fields(model_lib.Execution))


class ConfigError(ValueError):
    """A config that cannot run as it is; raised before anything compiles."""


def mesh_preset(name: str) -> hardware.MeshPreset:
    try:
        return hardware.mesh_preset(name)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def load_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config that a config file's ``get_config(arg)`` returns: what
    ``--config=path:arg`` gives a launcher, for programs and notebooks that build a run
    in Python."""
    spec = importlib.util.spec_from_file_location("run_config_file", os.fspath(path))
    if spec is None:
        raise ConfigError(f"{path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


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


def continue_from(config: ml_collections.ConfigDict, init_from: str) -> None:
    """Sets a pretraining ``config`` to continue from ``init_from``, an export (ours, or
    EAT/SSLAM/ASDA weights imported by launch/convert_torch.py): the model becomes the
    export's architecture and the input its normalisation, and student and teacher
    start from its encoder (``pretrain.init_from``); the decoder starts fresh. Nothing
    to do for an empty ``init_from``."""
    if not init_from:
        return
    description = export_at(init_from, "init_from")
    config.model = model_block(**description["model"])
    config.data.norm = tuple(description["norm"])
    config.pretrain.init_from = str(init_from)


def export_at(path: str, field: str) -> dict:
    """The description of the export at ``path`` (named by the config's ``field``), or
    a ConfigError saying how to make one."""
    description = checkpoints.export_description(path)
    if description is None:
        raise ConfigError(
            f"{field} {path}: not an export (<dir>/{checkpoints.EXPORT_CONFIG} and "
            "<dir>/params/); write one from a run with launch/export.py, or import weights "
            "with launch/convert_torch.py"
        )
    return description


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
    config.execution = block(model_lib.Execution, exclude=("chip",))
    if task in preset.remat:
        config.execution.remat_policy = preset.remat[task]
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
    config.topology = preset.compile_topology
    config.selfcheck = "auto"
    config.seed = 0
    config.num_train_steps = 1000
    config.log_every = 100
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    # (first, last): a JAX profiler trace of those steps, into <workdir>/profile
    config.profile_steps = config_dict.placeholder(tuple)
    config.probe = None
    return config


# ---------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run's config read and validated for the chip of the devices in use."""

    task: str
    model: model_lib.ModelConfig
    execution: model_lib.Execution
    data: pipeline.InputConfig
    eval_data: pipeline.InputConfig | None
    optim: optim.OptimConfig
    mask: masking.MaskConfig | None  # pretraining
    pretrain: objectives.PretrainConfig | None  # pretraining
    finetune: objectives.FinetuneConfig | None  # fine-tuning and linear probing
    mesh: dict
    mesh_dcn: dict | None
    num_processes: int | None
    seed: int
    num_train_steps: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    profile_steps: tuple[int, int] | None
    probe: dict | None  # {train_split, test_split}: a linear probe at the end
    selfcheck: str = "auto"  # one of SELFCHECK_MODES

    @property
    def chip(self) -> hardware.Chip:
        return self.execution.hardware


def dataclass_fields(cls, values, *, exclude: Sequence[str] = ()) -> dict:
    """The entries of ``values`` that are fields of ``cls`` (lists as tuples); an entry
    that is neither a field nor excluded is an error naming the known fields."""
    values = dict(values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names - set(exclude))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}


def typed_block(cls, values, **resolved):
    """``cls`` of a config block's values (and ``resolved`` fields), validated where it
    says how; its ValueError as a ConfigError."""
    try:
        typed = cls(**dataclass_fields(cls, values or {}), **resolved)
        return typed.validate() if hasattr(typed, "validate") else typed
    except ValueError as e:
        raise ConfigError(str(e)) from e


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


def execution(values, chip: hardware.Chip) -> model_lib.Execution:
    """How a run's model computes on devices of ``chip`` (the chip of the devices in
    use: never a setting)."""
    if "chip" in dict(values or {}):
        raise ConfigError("execution.chip is the devices' chip, not a setting")
    return typed_block(model_lib.Execution, values, chip=chip.name)


def input_config(values, chip: hardware.Chip) -> pipeline.InputConfig:
    """An InputConfig, its "auto" front end placed for ``chip``."""
    cfg = pipeline.InputConfig(**dataclass_fields(pipeline.InputConfig, values))
    if cfg.fbank_on == "auto":
        cfg = dataclasses.replace(cfg, fbank_on=chip.forms.fbank_on)
    return cfg


def optim_config(values, steps: int) -> optim.OptimConfig:
    """The OptimConfig with its schedule length resolved: ``steps`` (the run's), unless
    ``decay_steps`` sets another explicitly (not one that ends before the run)."""
    fields = dataclass_fields(optim.OptimConfig, values)
    if fields.get("decay_steps") is not None and fields["decay_steps"] < steps:
        raise ConfigError(
            f"optim.decay_steps ({fields['decay_steps']}) ends before the run's "
            f"num_train_steps ({steps}): its last steps would train at optim.min_lr; "
            "unset optim.decay_steps to decay over the run"
        )
    if fields.get("decay_steps") is None:
        fields["decay_steps"] = steps
    return typed_block(optim.OptimConfig, fields)


def profile_steps(value, steps: int) -> tuple[int, int] | None:
    """(first, last) steps to trace, 1 ≤ first ≤ last ≤ the run's steps; None: none."""
    if value is None or value == ():
        return None
    try:
        first, last = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"profile_steps must be two steps 'first,last', got {value!r}") from None
    if not 1 <= first <= last <= steps:
        raise ConfigError(
            f"profile_steps ({first}, {last}) must satisfy 1 <= first <= last <= "
            f"num_train_steps ({steps})"
        )
    return first, last


def read(config, chip: hardware.Chip) -> RunConfig:
    """``config`` typed and validated for devices of ``chip``: every check that needs
    neither the devices' count nor the files, each with a message naming the fix."""
    if config.task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {config.task!r}")
    pretraining = config.task == "pretrain"
    eval_data = config.get("eval_data")
    run = RunConfig(
        task=config.task,
        model=architecture(dict(config.model)),
        execution=execution(config.get("execution"), chip),
        data=input_config(config.data, chip),
        eval_data=None if eval_data is None else input_config(eval_data, chip),
        optim=optim_config(config.optim, config.num_train_steps),
        mask=typed_block(masking.MaskConfig, config.mask) if pretraining else None,
        pretrain=typed_block(objectives.PretrainConfig, config.pretrain) if pretraining else None,
        finetune=None if pretraining else typed_block(objectives.FinetuneConfig, config.finetune),
        mesh=dict(config.mesh),
        mesh_dcn=dict(config.mesh_dcn) if config.get("mesh_dcn") else None,
        num_processes=config.get("num_processes"),
        seed=config.seed,
        num_train_steps=config.num_train_steps,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints,
        profile_steps=profile_steps(config.get("profile_steps"), config.num_train_steps),
        probe=dict(config.probe) if config.get("probe") else None,
        selfcheck=config.get("selfcheck", "auto"),
    )
    if run.selfcheck not in SELFCHECK_MODES:
        raise ConfigError(f"selfcheck must be one of {SELFCHECK_MODES}, got {run.selfcheck!r}")
    if run.data.target_frames % run.model.patch_size:
        raise ConfigError(
            f"data.target_frames {run.data.target_frames} is not a multiple of the patch size "
            f"{run.model.patch_size}"
        )
    if pretraining and not 0 < run.pretrain.average_top_k_layers <= run.model.depth:
        raise ConfigError(
            f"pretrain.average_top_k_layers {run.pretrain.average_top_k_layers} must be in "
            f"1..{run.model.depth}"
        )
    run = _mlp_form_that_fits(run)
    return _decoder_form_that_fits(run) if pretraining else run


def mlp_kernel_vmem(run: RunConfig) -> int:
    """The VMEM the MLP kernel needs at this run's longest sequence (CLS and every
    patch: the teacher's in pretraining, the encoder's in fine-tuning)."""
    cfg = run.model
    return mlp_kernel.vmem_bytes(
        embed=cfg.embed_dim,
        hidden=cfg.mlp_dim,
        length=1 + math.prod(objectives.grid_shape(run.data.target_frames, cfg)),
        itemsize=jnp.dtype(run.execution.compute_dtype).itemsize,
    )


def _mlp_form_that_fits(run: RunConfig) -> RunConfig:
    """The MLP kernel holds both weight matrices and their float32 gradients in VMEM."""
    where = f"for a {run.model.embed_dim} → {run.model.mlp_dim} MLP"
    need = mlp_kernel_vmem(run)
    return _kernel_form_that_fits(run, "mlp_impl", run.execution.mlp, "MLP", need, where, "")


def decoder_kernel_vmem(run: RunConfig) -> int:
    """The VMEM the decoder kernel's widest block needs at this run's patch grid."""
    cfg = run.model
    return decoder_kernel.vmem_bytes(
        channels=max(cfg.embed_dim, cfg.decoder_dim),
        cout=cfg.decoder_dim,
        positions=math.prod(objectives.grid_shape(run.data.target_frames, cfg)),
        groups=cfg.decoder_groups,
        k=cfg.decoder_kernel,
        itemsize=jnp.dtype(run.execution.compute_dtype).itemsize,
    )


def _decoder_form_that_fits(run: RunConfig) -> RunConfig:
    """The decoder kernel holds an example's whole patch grid in VMEM."""
    where = f"at {run.data.target_frames} frames"
    need = decoder_kernel_vmem(run)
    form, fix = run.execution.decoder_conv, " or fewer frames"
    return _kernel_form_that_fits(run, "decoder_conv_impl", form, "decoder", need, where, fix)


def _kernel_form_that_fits(
    run: RunConfig, field: str, form: str, kernel: str, need: int, where: str, other_fix: str
) -> RunConfig:
    """Where ``form`` (``execution.<field>`` resolved for the chip) is a kernel that
    needs more VMEM (``need`` bytes) than the chip lends a kernel, the "auto" form is
    the XLA one (logged), and the kernel asked for by name is refused."""
    budget, ex = run.chip.kernel_vmem_bytes, run.execution
    if form != model_config.KERNEL_FORM or budget is None or need <= budget:
        return run
    why = (
        f"the {kernel} kernel needs about {need / 2**20:.0f} MiB of VMEM {where}, more than "
        f"the {budget / 2**20:.0f} MiB a {run.chip.name} kernel may use"
    )
    if getattr(ex, field) != "auto":
        raise ConfigError(f"{why}; set execution.{field}=xla{other_fix}")
    logging.info("%s: the %s runs XLA's form", why, kernel)
    return dataclasses.replace(run, execution=dataclasses.replace(ex, **{field: "xla"}))


# ---------------------------------------------------------------------------- validating


def validate(
    config, *, chip: hardware.Chip, device_count: int, process_count: int, require_files=True
) -> RunConfig:
    """``read``, then the checks against the devices, hosts and files, each with a
    message naming the fix; ``require_files=False`` leaves out the datasets and the
    checkpoint to start from (compiling ahead of time needs neither)."""
    run = read(config, chip)
    if run.num_processes is not None and run.num_processes != process_count:
        raise ConfigError(
            f"config expects {run.num_processes} processes but JAX sees {process_count}: on a "
            "multi-host pod every host must run this command (jax.distributed.initialize joins "
            "them); set --config.num_processes to match"
        )
    _validate_mesh(run, device_count, process_count)
    if require_files:
        for data in filter(None, (run.data, run.eval_data)):
            _require_dataset(data)
        if run.finetune is not None and run.finetune.init_from:
            try:
                checkpoints.locate_params(run.finetune.init_from)
            except checkpoints.CheckpointMismatch as e:
                raise ConfigError(f"finetune.init_from: {e}") from e
        if run.pretrain is not None and run.pretrain.init_from:
            export_at(run.pretrain.init_from, "pretrain.init_from")
    return run


def _validate_mesh(run: RunConfig, device_count: int, process_count: int) -> None:
    """The mesh fits the devices, the batch splits over it, the model over its axes."""
    dcn = run.mesh_dcn or {}
    slices = math.prod(dcn.values()) if dcn else 1
    try:
        data_size, fsdp, tensor = sharding.resolve_mesh_shape(run.mesh, device_count // slices)
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from e
    data_parallel = data_size * fsdp * dcn.get("data", 1) * dcn.get("fsdp", 1)
    batch = run.data.batch_size
    if batch % process_count or batch % data_parallel:
        raise ConfigError(
            f"data.batch_size {batch} clips must divide over {process_count} hosts "
            f"and over the {data_parallel}-way data-parallel mesh (every device takes whole "
            f"clips); use a multiple of {math.lcm(process_count, data_parallel)}"
        )
    # these kernels split only the examples over devices: each tensor rank would gather
    # the whole weights and repeat its examples' whole computation
    whole_per_device = [
        f"execution.{field}" for field, form in
        (("mlp_impl", run.execution.mlp), ("decoder_conv_impl", run.execution.decoder_conv))
        if form == model_config.KERNEL_FORM and (field == "mlp_impl" or run.task == "pretrain")
    ]  # fmt: skip
    if tensor > 1 and whole_per_device:
        raise ConfigError(
            f"mesh tensor={tensor}: the {' and '.join(whole_per_device)} Pallas kernels would "
            f"repeat every example's whole computation on each tensor rank; set "
            f"{', '.join(f'{name}=xla' for name in whole_per_device)}, or tensor=1"
        )
    for what, size, axis, width in (
        ("embed_dim", run.model.embed_dim, "fsdp", fsdp),
        ("decoder_dim", run.model.decoder_dim, "fsdp", fsdp),
        ("num_heads", run.model.num_heads, "tensor", tensor),
        ("mlp width", run.model.mlp_dim, "tensor", tensor),
    ):
        if size % width:
            raise ConfigError(f"model {what} {size} does not split over mesh axis {axis}={width}")


def _require_dataset(data: pipeline.InputConfig) -> None:
    try:
        dataset = datasets.load(data.dataset, data.data_dir)
        dataset.source(data.split)
    except (datasets.DatasetNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
