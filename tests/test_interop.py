"""The authors' checkpoints through launch/convert_torch.py, exports, resharding restores."""

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import torch

from asda_jax import (
    audio,
    checkpoints,
    config_lib,
    inference,
    sharding,
    torch_import,
    train_lib,
    train_state,
)
from asda_jax import model as model_lib
from asda_jax.data import datasets
from asda_jax.testing import torch_reference as ref
from tests import train_helpers as th

DIM, DEPTH, HEADS, CLASSES = 64, 2, 4, 5
FRAMES = 96  # 6 × 8 patches


def release_model(seed: int, **kw) -> ref.ReleaseModel:
    model = ref.ReleaseModel(dim=DIM, depth=DEPTH, num_heads=HEADS, **kw)
    return ref.randomize_(model, seed).eval()


@contextlib.contextmanager
def fairseq_meters():
    """A stand-in ``fairseq.logging.meters`` while a pickle is written, so the pickle
    names a fairseq class; removed after, as the loader must not need fairseq."""
    module = types.ModuleType("fairseq.logging.meters")

    class AverageMeter:
        def __init__(self):
            self.val, self.count = 0.5, 3

    AverageMeter.__module__ = module.__name__
    AverageMeter.__qualname__ = "AverageMeter"
    module.AverageMeter = AverageMeter
    packages = {"fairseq": types.ModuleType("fairseq"), "fairseq.logging": types.ModuleType("x")}
    stand_ins = {**packages, module.__name__: module}
    sys.modules.update(stand_ins)
    try:
        yield module
    finally:
        for name in stand_ins:
            del sys.modules[name]


def save_release(path, model: ref.ReleaseModel, teacher=None, finetuned=False, task=None):
    """The release's container: fp16 student, fp32 ``_ema`` as a nested dict, fairseq
    meters pickled in ``extra_state``, ``task`` as its cfg's task section."""
    state = {k: v.half() for k, v in model.state_dict().items()}
    if finetuned:
        head = ("fc_norm.", "head.")
        state = {(k if k.startswith(head) else "model." + k): v for k, v in state.items()}
    if teacher is not None:
        state["_ema"] = {k: v.float() for k, v in teacher.state_dict().items()}
    with fairseq_meters() as meters:
        checkpoint = {
            "args": None,
            "cfg": {"model": {"_name": "ASDA"}, **({"task": task} if task else {})},
            "model": state,
            "extra_state": {"metrics": {"train": meters.AverageMeter()}},
        }
        torch.save(checkpoint, path)


def rounded(model: ref.ReleaseModel) -> ref.ReleaseModel:
    """The model with its weights as the fp16 file holds them (the converter's input).

    The fixed positional table is left exact: the converter recomputes it rather than
    loading its fp16 copy (the report gives the distance, 2.4e-4 here)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("positions"):
                p.copy_(p.half().float())
    return model


def convert(checkpoint, output, *extra):
    command = [
        sys.executable,
        str(th.ROOT / "launch" / "convert_torch.py"),
        f"--checkpoint={checkpoint}",
        f"--output={output}",
        f"--num_heads={HEADS}",
        *extra,
    ]
    return subprocess.run(command, cwd=th.ROOT, capture_output=True, text=True, timeout=300)


def spectrogram(seed=0):
    return np.random.default_rng(seed).normal(size=(2, FRAMES, 128)).astype(np.float32)


@pytest.mark.subprocess
def test_a_pretraining_checkpoint_converts_to_the_same_features(tmp_path):
    student = release_model(0, decoder_layers=2, decoder_groups=4, decoder_grid=(6, 8))
    teacher = release_model(1)
    save_release(tmp_path / "pretrained.pt", student, teacher)
    refused = convert(tmp_path / "pretrained.pt", tmp_path / "export")  # its cfg has no task
    assert refused.returncode == 2 and "pass --target_frames and --norm" in refused.stderr
    assert not (tmp_path / "export").exists()
    done = convert(tmp_path / "pretrained.pt", tmp_path / "export",
                   f"--target_frames={FRAMES}", "--norm=audioset")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'"target_frames": "{FRAMES} from --target_frames"' in done.stdout
    assert '"missing": []' in done.stdout and '"unexpected": []' in done.stdout
    assert_architecture_only(tmp_path / "export")
    spec = spectrogram()
    for which, model in (("encoder", rounded(student)), ("teacher", teacher)):
        encode, cfg, run, _ = inference.load_encoder(tmp_path / "export", which=which)
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (DIM, DEPTH, HEADS)
        assert run == model_lib.Execution(chip="cpu")  # this machine's defaults
        with torch.no_grad():
            expected, _ = model(torch.from_numpy(spec))
        ours = np.asarray(encode(spec))
        np.testing.assert_allclose(ours[:, 0], expected[:, 0].numpy(), atol=1e-4)  # CLS
        np.testing.assert_allclose(ours[:, 1:], expected[:, 1:].numpy(), atol=1e-4)  # frames
    again = convert(tmp_path / "pretrained.pt", tmp_path / "export", "--target_frames=64",
                    "--norm=audioset")  # fmt: skip
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.subprocess
def test_a_fine_tuned_checkpoint_converts_to_the_same_logits(tmp_path):
    model = release_model(2, num_classes=CLASSES)
    task = {"_name": "audio_classification", "target_length": FRAMES, "esc50_eval": True}
    save_release(tmp_path / "finetuned.pt", model, finetuned=True, task=task)
    done = convert(tmp_path / "finetuned.pt", tmp_path / "export")  # its cfg says the input
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"norm": "esc50 from cfg esc50_eval"' in done.stdout
    classify, _, inputs = inference.load_classifier(tmp_path / "export")
    assert inputs.target_frames == FRAMES and inputs.num_classes == CLASSES
    assert inputs.norm == audio.NORM_STATS["esc50"]
    spec = spectrogram(1)
    with torch.no_grad():
        expected = torch.sigmoid(rounded(model).logits(torch.from_numpy(spec))).numpy()
    np.testing.assert_allclose(np.asarray(classify(spec)), expected, atol=1e-4)


@pytest.mark.subprocess
def test_missing_and_mismatched_tensors_are_reported(tmp_path):
    model = release_model(0)
    state = model.state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.v.weight"] = torch.zeros(DIM, DIM + 1)
    state["something.else"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "broken.pt")
    release = torch_import.split_state(torch_import.load_checkpoint(tmp_path / "broken.pt"))
    cfg = torch_import.infer_config(release.student, HEADS)
    report = torch_import.key_report(release, cfg)
    assert report == {
        "missing": ["blocks.1.mlp.fc2.bias"],
        "unexpected": ["something.else"],
        "shape_mismatches": ["blocks.0.attn.v.weight: file (64, 65), model (64, 64)"],
    }
    done = convert(tmp_path / "broken.pt", tmp_path / "out")
    assert done.returncode == 2 and "blocks.1.mlp.fc2.bias" in done.stderr
    del state["something.else"]
    state["blocks.1.mlp.fc2.bias"] = torch.zeros(DIM)
    torch.save({"model": state}, tmp_path / "shapes.pt")
    done = convert(tmp_path / "shapes.pt", tmp_path / "out")
    assert done.returncode == 2 and "blocks.0.attn.v.weight: file (64, 65)" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def save_like_fairseqs_trainer(path, model: ref.ReleaseModel) -> None:
    """The dict fairseq's ``Trainer.save_checkpoint`` and ``checkpoint_utils.
    save_checkpoint`` fill, pre-hydra: ``args`` as an argparse Namespace, the optimizer's
    whole state, its history with the scheduler's state, and ``extra_state`` with the
    meters, the validation loss and the best score as NumPy scalars."""
    weights = {k: v.half() for k, v in model.state_dict().items()}
    moments = {i: {"step": torch.tensor(400.0), "exp_avg": torch.zeros(3),
                   "exp_avg_sq": torch.ones(3)} for i in range(2)}  # fmt: skip
    with fairseq_meters() as meters:
        checkpoint = {
            "args": argparse.Namespace(
                arch="data2vec_multi", lr=[0.0005], max_update=400_000, fp16=True, seed=np.int64(1)
            ),
            "cfg": None,
            "model": weights,
            "criterion": None,
            "optimizer_history": [
                {
                    "criterion_name": "ModelCriterion",
                    "optimizer_name": "FairseqAdam",
                    "lr_scheduler_state": {"best": np.float64(0.4137)},
                    "num_updates": 400_000,
                }
            ],
            "task_state": {},
            "extra_state": {
                "metrics": {"train": {"loss": meters.AverageMeter()}},
                "previous_training_time": 123_456.7,
                "train_iterator": {"epoch": 11, "iterations_in_epoch": 0, "shuffle": True},
                "val_loss": np.float64(0.4137),
                "best": np.float32(0.4137),
                "dtype": np.dtype("float16"),
            },
            "last_optimizer_state": {
                "state": moments,
                "param_groups": [{"lr": 0.0005, "betas": (0.9, 0.98), "params": [0, 1]}],
                "loss_scale": np.float32(128.0),
            },
        }
        torch.save(checkpoint, path)


def test_a_checkpoint_as_fairseqs_trainer_writes_it_reads_as_the_minimal_one(tmp_path):
    model = release_model(3)
    save_like_fairseqs_trainer(tmp_path / "trainer.pt", model)
    torch.save({"model": {k: v.half() for k, v in model.state_dict().items()}},
               tmp_path / "minimal.pt")  # fmt: skip
    full = torch_import.load_checkpoint(tmp_path / "trainer.pt")
    assert full["args"].max_update == 400_000 and full["extra_state"]["val_loss"] == 0.4137
    cfg = torch_import.infer_config(torch_import.split_state(full).student, num_heads=HEADS)
    params = {
        name: torch_import.convert(
            torch_import.split_state(torch_import.load_checkpoint(tmp_path / name)), cfg
        )
        for name in ("trainer.pt", "minimal.pt")
    }
    jax.tree.map(np.testing.assert_array_equal, params["trainer.pt"], params["minimal.pt"])


def test_a_release_checkpoints_input_is_read_from_its_config_or_required():
    legacy = {"args": argparse.Namespace(target_length=128, spcv2_eval=True), "cfg": None}
    assert torch_import.release_input(legacy, None, None)[:2] == (128, "spcv2")
    hydra = {"cfg": {"task": {"target_length": 1024, "esc50_eval": False}}}
    frames, norm, said = torch_import.release_input(hydra, None, None)
    assert (frames, norm) == (1024, "audioset") and said["norm"].endswith("no dataset flag")
    assert torch_import.release_input(hydra, 512, "esc50")[:2] == (512, "esc50")  # flags win
    with pytest.raises(ValueError, match="pass --target_frames and --norm"):
        torch_import.release_input({"cfg": {"model": {}}, "args": None}, None, None)
    with pytest.raises(ValueError, match=r"\(norm\): pass --norm"):
        torch_import.release_input({}, 1024, None)


class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.subprocess
def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"model": release_model(0).state_dict(), "x": Payload(marker)}, tmp_path / "a.pt")
    with open(tmp_path / "b.pt", "wb") as f:  # a legacy (non-zip) pickle with the same payload
        pickle.dump({"model": {}, "x": Payload(marker)}, f)
    for name in ("a.pt", "b.pt"):
        with pytest.raises(torch_import.UnsafeCheckpoint):
            torch_import.load_checkpoint(tmp_path / name)
        done = convert(tmp_path / name, tmp_path / f"out-{name}")
        assert done.returncode == 2 and "error:" in done.stderr
    with pytest.raises(torch_import.UnsafeCheckpoint, match="system"):  # names what it refused
        torch_import.load_checkpoint(tmp_path / "a.pt")
    assert not marker.exists()  # the payload never ran
    pickle.loads(pickle.dumps(Payload(marker)))  # control: unpickling it for real does run it
    assert marker.exists()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    datasets.prepare("synthetic", root, clips_per_class=4)
    return str(root)


def trained_state(data_dir, workdir, mesh_shape):
    config = th.tiny_config(data_dir, num_train_steps=2, checkpoint_every=2)
    config.mesh = dict(zip(("data", "fsdp", "tensor"), mesh_shape, strict=True))
    state, task, _ = train_lib.train(config, workdir)
    return state, task


def restore_onto(task, workdir, mesh):
    plan = train_state.plan_state(task, mesh, jax.random.PRNGKey(0))
    ckpt = checkpoints.Checkpoints(workdir)
    try:
        state, _ = ckpt.restore(ckpt.latest_step(), plan.restore_target())
    finally:
        ckpt.close()
    return state, plan.shardings


def saved_params(workdir):
    """The checkpoint's parameters as saved, read onto one device without resharding."""
    item, prefix = checkpoints.locate_params(workdir)
    return checkpoints.restore_item(item, prefix)


def assert_architecture_only(export) -> None:
    """The export's model.json holds exactly the ModelConfig's fields."""
    saved = checkpoints.export_description(export)["model"]
    assert set(saved) == {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    assert not set(saved) & set(config_lib.EXECUTION_FIELDS)


def assert_restored(state, shardings, expected_params) -> None:
    assert int(state.step) == 2
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == want
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.train
def test_a_checkpoint_saved_on_8_devices_restores_on_1(data_dir, tmp_path):
    saved, task = trained_state(data_dir, tmp_path, (2, 2, 2))
    qk = saved.params["encoder"]["blocks_0"]["attn"]["qk"]["kernel"]
    assert len(qk.sharding.device_set) == 8
    state, shardings = restore_onto(
        task, tmp_path, sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    )
    assert_restored(state, shardings, saved.params)


@pytest.mark.subprocess
def test_a_checkpoint_saved_on_1_device_restores_on_8(data_dir, tmp_path):
    flags = ["--config=configs/demo.py", *th.tiny_flags(data_dir, num_train_steps=2)]
    one_device = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    proc = th.launch_train(tmp_path, flags, one_device)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    task = th.task_on_cpu(th.tiny_config(data_dir))
    state, shardings = restore_onto(task, tmp_path, sharding.make_mesh((2, 2, 2)))
    qk = state.params["encoder"]["blocks_0"]["attn"]["qk"]["kernel"]
    assert len(qk.sharding.device_set) == 8
    assert_restored(state, shardings, saved_params(tmp_path))


# How the run computed; none of it may travel with its export.
RUN_EXECUTION = {
    "remat_policy": "full",
    "decoder_conv_impl": "xla",
    "attention_impl": "reference",
}


@pytest.fixture(scope="module")
def exported_run(data_dir, tmp_path_factory):
    """A tiny pretraining run (computing in non-default ways) and its export."""
    root = tmp_path_factory.mktemp("exported")
    config = th.tiny_config(data_dir, num_train_steps=2, checkpoint_every=2)
    config.execution.update(RUN_EXECUTION)
    train_lib.train(config, root / "run")
    command = [
        sys.executable,
        str(th.ROOT / "launch" / "export.py"),
        f"--workdir={root / 'run'}",
        f"--output={root / 'export'}",
    ]
    done = subprocess.run(command, cwd=th.ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run", root / "export"


@pytest.mark.subprocess
def test_an_exported_run_feeds_fine_tuning_and_extraction(data_dir, exported_run, tmp_path):
    run_dir, export = exported_run
    description = checkpoints.export_description(export)
    assert description["kind"] == "pretrain" and description["model"]["embed_dim"] == 64
    assert_architecture_only(export)
    encode_run, _, _, _ = inference.load_encoder(run_dir)
    encode_export, _, run, _ = inference.load_encoder(export)
    assert run == model_lib.Execution(chip="cpu")  # not the run's remat or kernels
    spec = spectrogram()[:, :64]
    np.testing.assert_array_equal(np.asarray(encode_run(spec)), np.asarray(encode_export(spec)))
    config = config_lib.load_file("configs/finetune_demo.py", f"data_dir={data_dir}")
    config.finetune.init_from = str(export)
    config.model.preset = "tiny"
    config.data.target_frames = config.eval_data.target_frames = 64
    config.num_train_steps = config.optim.warmup_steps = 0
    state, _, _ = train_lib.train(config, tmp_path / "ft")
    exported = saved_params(export)["encoder"]
    for a, b in zip(
        jax.tree.leaves(state.params["encoder"]), jax.tree.leaves(exported), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.subprocess
def test_an_export_or_run_of_another_layout_is_refused_by_name(exported_run):
    """Exports and run configs are not yet a stable format: a description this version
    did not write (execution settings under ``model``, a field it has not, a missing
    input normalisation) is refused with the name, never loaded in a guessed form."""
    run_dir, export = exported_run
    path = export / checkpoints.EXPORT_CONFIG
    written = json.loads(path.read_text())
    for changed, named in (
        ({"model": written["model"] | {"attention_impl": "xla"}}, r"model\.attention_impl"),
        ({"model": written["model"] | {"frobnicate": 3}}, "frobnicate"),
        ({"norm": None}, "norm"),
    ):
        described = {k: v for k, v in (written | changed).items() if v is not None}
        path.write_text(json.dumps(described))
        with pytest.raises(checkpoints.CheckpointMismatch, match=named):
            inference.load_encoder(export)
    path.write_text(json.dumps(written))
    config = run_dir / "config.json"
    saved = json.loads(config.read_text())
    config.write_text(json.dumps(saved | {"model": saved["model"] | {"remat_policy": "full"}}))
    with pytest.raises(checkpoints.CheckpointMismatch, match=r"model\.remat_policy"):
        inference.load_encoder(run_dir)
    config.write_text(json.dumps(saved))


def test_only_process_0_makes_an_export_folder_and_every_process_hears_its_answer(
    tmp_path, monkeypatch
):
    """Process 1 of 2 (simulated): it makes nothing itself and waits for process 0's
    answer, refusing as process 0 refused a folder that holds files."""
    made, answers = [], []

    def as_process(index: int, process_0_made: bool):
        monkeypatch.setattr(jax, "process_index", lambda: index)
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(checkpoints.storage, "make_new_folder", made.append)

        def broadcast(value):
            answers.append(bool(value))
            return np.bool_(process_0_made)

        monkeypatch.setattr(checkpoints.multihost_utils, "broadcast_one_to_all", broadcast)

    as_process(1, process_0_made=True)
    checkpoints.make_export_folder(tmp_path / "export")
    assert made == [] and answers == [True]
    as_process(1, process_0_made=False)
    with pytest.raises(FileExistsError, match="process 0 refused"):
        checkpoints.make_export_folder(tmp_path / "export")
    as_process(0, process_0_made=True)
    checkpoints.make_export_folder(tmp_path / "export")
    assert made == [tmp_path / "export"]
