"""The authors' PyTorch/fairseq checkpoints: read safely into our parameter trees, and
ours written in their layout.

A release ``.pt`` is a pickled fairseq dict: ``model`` (the state_dict), ``cfg``, and
``extra_state`` that pickles fairseq's meter objects. Nothing in it is ever executed:
the file is read with ``torch.load(weights_only=True)``, whose unpickler only builds
tensors, containers and allow-listed classes. Classes of the metadata packages
(``fairseq``, ``omegaconf``) become inert stand-ins (no code of theirs runs; their
state is just stored); NumPy scalars, dtypes and arrays and argparse's ``Namespace``
are built as the data they are; any other global — ``os.system``, ``builtins.eval``, a
class of some other package — makes the load fail with the list of what was refused.

Pretraining checkpoints hold the student (fp16 in the release), ``_ema`` (the teacher,
a nested dict, fp32) and the decoder; fine-tuned ones prefix the encoder with
``model.`` and add ``fc_norm``/``head``. Everything is cast to float32. EAT's own
checkpoints (plain attention with a fused ``attn.qkv``) are read the same way.

``write_release_checkpoint`` writes the same dict the other way (``model`` and a ``cfg``
of plain values), pickling nothing but tensors and plain containers.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from etils import epath

from asda_jax import checkpoints, release_weights, storage
from asda_jax import model as model_lib
from asda_jax.model import ModelConfig

METADATA_PACKAGES = ("fairseq.", "omegaconf.")  # inert stand-ins are made for these only


def _data_globals() -> dict[str, object]:
    """Globals a fairseq trainer's checkpoint names that build data and run nothing of
    the file's choosing: NumPy scalars, dtypes and arrays (validation losses, best
    scores, meter values) and argparse's Namespace (the ``args`` record of checkpoints
    from before fairseq's hydra configs), each under NumPy 1's and NumPy 2's names."""
    import argparse

    multiarray = np._core.multiarray
    found: dict[str, object] = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    for package in ("numpy.core", "numpy._core"):
        found[f"{package}.multiarray.scalar"] = multiarray.scalar
        found[f"{package}.multiarray._reconstruct"] = multiarray._reconstruct
    found["argparse.Namespace"] = argparse.Namespace
    return found


FINETUNED_PREFIX = "model."


class UnsafeCheckpoint(ValueError):
    """A checkpoint whose pickle names code that would run on load; it was not loaded."""


def _stand_in(qualified: str) -> type:
    """An inert class pickle can fill with state, named like ``qualified``."""
    module, _, name = qualified.rpartition(".")
    return type(name, (), {"__module__": module, "__setstate__": _keep_state})


def _keep_state(self, state) -> None:
    self.__dict__["pickled_state"] = state


def load_checkpoint(path: str | Path) -> dict:
    """The unpickled checkpoint dict, read without running any code it names."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a torch zip: legacy formats are refused, not guessed at
        raise UnsafeCheckpoint(
            f"{path} is not a torch.save zip archive ({e}); re-save it with torch.save"
        ) from e
    data = _data_globals()
    refused = [g for g in unsafe if not g.startswith(METADATA_PACKAGES) and g not in data]
    if refused:
        raise UnsafeCheckpoint(
            f"{path} refers to code outside tensors and containers: {refused}. It was not "
            "loaded: a pickle that names these would run them. Only tensors, containers, "
            f"NumPy and argparse data, and the metadata classes of {METADATA_PACKAGES} "
            "are accepted"
        )
    allowed = [(data[g], g) if g in data else _stand_in(g) for g in unsafe]
    if any(g.startswith("numpy.") for g in unsafe):  # a dtype's class, named at BUILD only
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    try:
        with torch.serialization.safe_globals(allowed):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(f"{path}: refused by the weights-only unpickler: {e}") from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def task_config(checkpoint: Mapping) -> Mapping:
    """The task section of a checkpoint's config: ``cfg["task"]`` (hydra-era fairseq),
    else the legacy ``args`` Namespace's fields, else nothing."""
    import argparse

    cfg, args = checkpoint.get("cfg"), checkpoint.get("args")
    if isinstance(cfg, Mapping) and isinstance(cfg.get("task"), Mapping):
        return cfg["task"]
    return vars(args) if isinstance(args, argparse.Namespace) else {}


# The release's dataset flags and the normalisation each selects; none set: AudioSet's.
NORM_FLAGS = {"esc50_eval": "esc50", "spcv2_eval": "spcv2", "fsd50k_eval": "fsd50k"}


def release_input(
    checkpoint: Mapping, target_frames: int | None, norm: str | None
) -> tuple[int, str, dict[str, str]]:
    """(input frames, normalisation, where each came from) of a release checkpoint: the
    flags where given, else its task config (``cfg["task"]``, or the legacy ``args``):
    ``target_length``, and the dataset flag that chose the statistics. Raises
    ValueError naming the flag where neither says."""
    task = task_config(checkpoint)
    frames_from, norm_from = "--target_frames", "--norm"
    if target_frames is None and task.get("target_length") is not None:
        target_frames, frames_from = int(task["target_length"]), "cfg target_length"
    if norm is None and "target_length" in task:  # a task config: its flags are all there
        flag = next((f for f in NORM_FLAGS if task.get(f)), None)
        norm, norm_from = NORM_FLAGS.get(flag, "audioset"), f"cfg {flag or 'no dataset flag'}"
    missing = [name for name, value in (("target_frames", target_frames), ("norm", norm))
               if value is None]  # fmt: skip
    if missing:
        raise ValueError(
            f"this checkpoint's config does not say its input ({', '.join(missing)}): pass "
            + " and ".join(f"--{m}" for m in missing)
            + " (1024 frames and audioset for AudioSet, 512 and esc50 for ESC-50, 128 and "
            "spcv2 for Speech Commands)"
        )
    said = {
        "target_frames": f"{target_frames} from {frames_from}",
        "norm": f"{norm} from {norm_from}",
    }
    return target_frames, norm, said


def to_numpy(tree) -> dict:
    """Tensors (nested dicts of them) as float32 NumPy arrays."""
    import torch

    if isinstance(tree, Mapping):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return tree.detach().to(torch.float32).numpy()
    return tree


@dataclasses.dataclass
class ReleaseState:
    """The tensors of a release checkpoint, split by role."""

    student: dict[str, np.ndarray]  # encoder (+ decoder) names without a prefix
    teacher: dict[str, np.ndarray] | None  # _ema, pretraining only
    head: dict[str, np.ndarray] | None  # fc_norm.* and head.*, fine-tuned only

    @property
    def kind(self) -> str:
        return "finetuned" if self.head is not None else "pretrained"


def split_state(state: Mapping) -> ReleaseState:
    """The checkpoint's ``model`` state_dict (or the state_dict itself) by role."""
    state = state.get("model", state)
    if not isinstance(state, Mapping):
        raise ValueError("the checkpoint has no 'model' state_dict")
    tensors = {k: v for k, v in to_numpy(state).items() if k != "_ema"}
    teacher = to_numpy(state["_ema"]) if "_ema" in state else None
    if any(k.startswith(("fc_norm.", "head.")) for k in tensors):
        head = {k: v for k, v in tensors.items() if k.startswith(("fc_norm.", "head."))}
        student = {k.removeprefix(FINETUNED_PREFIX): v for k, v in tensors.items() if k not in head}
        return ReleaseState(student, teacher, head)
    return ReleaseState(tensors, teacher, None)


def infer_config(student: Mapping[str, np.ndarray], num_heads: int | None = None) -> ModelConfig:
    """The ModelConfig the tensor shapes imply (heads: 64 wide unless given)."""
    image = release_weights.IMAGE
    try:
        dim = student[image + "extra_tokens"].shape[-1]
        patch = student[image + "local_encoder.proj.weight"].shape[-1]
        mlp = student["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an ASDA/EAT release state_dict: no {e}") from e
    depth = len({k.split(".")[1] for k in student if k.startswith("blocks.")})
    plain = "blocks.0.attn.qkv.weight" in student  # EAT's fused projection
    decoder = [
        k for k in student if k.startswith(image + "decoder.blocks.") and k.endswith("0.weight")
    ]
    fields = dict(
        embed_dim=dim,
        depth=depth,
        num_heads=num_heads or dim // 64,
        mlp_ratio=mlp / dim,
        patch_size=patch,
        attention="plain" if plain else "asda",
        decoder_dim=dim,
    )
    positions = student.get(release_weights.POSITIONS)
    if positions is not None:
        fields["max_time_patches"] = positions.shape[1] // (128 // patch)
    if decoder:
        groups = dim // student[decoder[0]].shape[1]
        fields |= dict(decoder_layers=len(decoder), decoder_groups=groups)
    return ModelConfig(**fields).validate()


def key_report(release: ReleaseState, cfg: ModelConfig) -> dict[str, list[str]]:
    """Release names the mapping needs but the file lacks, names it does not use, and
    tensors whose shapes differ from what ``cfg`` needs."""
    decoder = any(k.startswith(release_weights.IMAGE + "decoder.") for k in release.student)
    report = _compare(release.student, release_weights.release_shapes(cfg, decoder))
    if release.teacher is not None:
        teacher = _compare(release.teacher, release_weights.release_shapes(cfg, False))
        report |= {f"{k}_in_ema": v for k, v in teacher.items()}
    if release.head is not None:
        classes = release.head.get("head.bias", np.zeros(0)).shape[0]
        head = {"fc_norm.weight": (cfg.embed_dim,), "fc_norm.bias": (cfg.embed_dim,)}
        head |= {"head.weight": (classes, cfg.embed_dim), "head.bias": (classes,)}
        for k, v in _compare(release.head, head).items():
            report[k] += v
    return report


def _compare(tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple]) -> dict:
    return release_weights.compare_shapes({k: v.shape for k, v in tensors.items()}, shapes)


def convert(release: ReleaseState, cfg: ModelConfig) -> dict:
    """Our parameter tree: encoder (+ decoder, teacher) or encoder + fc_norm + head."""
    params = {"encoder": release_weights.encoder_params(release.student, cfg)}
    if release.head is not None:
        params |= release_weights.head_params(release.head)
        return params
    if cfg.decoder_layers and any(".decoder." in k for k in release.student):
        params["decoder"] = release_weights.decoder_params(release.student, cfg)
    if release.teacher is not None:
        params["teacher"] = release_weights.encoder_params(release.teacher, cfg)
    return params


def check_shapes(params: dict, cfg: ModelConfig) -> None:
    """Raises CheckpointMismatch where a converted tensor's shape differs from our model's."""
    spec = (1, cfg.patch_size, cfg.num_mel_bins)
    expected = {"encoder": model_lib.abstract_params(model_lib.Encoder(cfg), spec)}
    expected["teacher"] = expected["encoder"]
    grid = (1, 1, cfg.freq_patches, cfg.embed_dim)
    expected["decoder"] = model_lib.abstract_params(model_lib.Decoder(cfg), grid)
    if "head" in params:
        num_classes = params["head"]["bias"].shape[0]
        classifier = model_lib.abstract_params(model_lib.Classifier(cfg, num_classes), spec)
        expected |= {"fc_norm": classifier["fc_norm"], "head": classifier["head"]}
    for name, tree in params.items():
        checkpoints.check_fits(tree, expected[name], f"converted {name}")


def release_state(params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The release's ``model`` state_dict of our parameters: a pretraining tree
    ({encoder, decoder[, teacher]}: the teacher as the nested ``_ema`` dict) or a
    classifier ({encoder, fc_norm, head}: the encoder under ``model.``)."""
    encoder = release_weights.encoder_tensors(cfg)
    state = release_weights.to_state(params["encoder"], encoder)
    state[release_weights.POSITIONS] = release_weights.positions_table(cfg)
    if "head" in params:
        classes = int(np.shape(params["head"]["bias"])[0])
        head = release_weights.to_state(params, release_weights.head_tensors(cfg, classes))
        return {FINETUNED_PREFIX + k: v for k, v in state.items()} | head
    if "decoder" in params:
        state |= release_weights.to_state(params["decoder"], release_weights.decoder_tensors(cfg))
    if "teacher" in params:
        teacher = release_weights.to_state(params["teacher"], encoder)
        state["_ema"] = teacher | {release_weights.POSITIONS: state[release_weights.POSITIONS]}
    return state


def write_release_checkpoint(
    path: str | Path, params: Mapping, cfg: ModelConfig, release_cfg: Mapping | None = None
) -> epath.Path:
    """``params`` as a release ``.pt`` ({"args": None, "cfg": plain dict, "model":
    state_dict}). ``cfg`` holds the architecture under the release's names, or, given
    ``release_cfg`` (the ``cfg`` of a release checkpoint of the same architecture),
    that whole config, which fairseq's loader needs to rebuild the model."""
    import torch

    path = storage.path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new file")

    def tensors(tree):
        if isinstance(tree, Mapping):
            return {k: tensors(v) for k, v in tree.items()}
        return torch.from_numpy(np.array(tree, np.float32))

    architecture = dict(
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio, norm_eps=1e-6, layer_norm_first=False,
    )  # fmt: skip
    written_cfg = {"model": architecture}
    if release_cfg is not None:
        theirs = dict(release_cfg.get("model") or {})
        differ = [f"{k}: {theirs.get(k)} vs ours {v}" for k, v in architecture.items()
                  if k in ("embed_dim", "depth", "num_heads") and theirs.get(k) != v]  # fmt: skip
        if differ:
            raise ValueError(f"the release cfg describes another architecture: {differ}")
        written_cfg = dict(release_cfg)
    state = tensors(release_state(params, cfg))
    storage.make_folder(path.parent)
    with path.open("wb") as f:  # a bucket's object appears whole, when the file closes
        torch.save({"args": None, "cfg": written_cfg, "model": state}, f)
    return path
