"""The device self-check (asda_jax/selfcheck.py, launch/selfcheck.py) in interpret mode on
CPU: the real kernels agree with their XLA forms; a kernel made wrong here is caught,
and a run with it falls back to the XLA form, says so and trains as an XLA run does."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from asda_jax import aot, config_lib, hardware, selfcheck, sharding, train_lib
from asda_jax.data import datasets
from asda_jax.kernels import decoder as decoder_kernel
from asda_jax.kernels import mlp as mlp_kernel
from asda_jax.model.config import DTYPES
from tests.train_helpers import ROOT, tiny_config

KERNELS_INTERPRETED = {
    "execution.interpret_kernels": True,
    "execution.mlp_impl": "pallas",
    "execution.decoder_conv_impl": "pallas",
    "execution.attention_impl": "pallas_short",
    "execution.dtype": "bfloat16",
}


def checked_run(config):
    run = config_lib.validate(
        config, chip=hardware.HOST, device_count=jax.device_count(), process_count=1,
        require_files=False,
    )  # fmt: skip
    return run, selfcheck.check_run(run, sharding.make_mesh(run.mesh), timed_calls=1)


def by_kernel(checks) -> dict[str, list[selfcheck.Check]]:
    found: dict[str, list] = {}
    for c in checks:
        found.setdefault(c.kernel, []).append(c)
    return found


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    datasets.prepare("synthetic", root, clips_per_class=2)
    return root


@pytest.fixture(scope="module")
def interpreted_config(data_dir):
    return tiny_config(data_dir, **KERNELS_INTERPRETED)


def test_the_real_kernels_agree_with_their_xla_forms_in_bfloat16(interpreted_config):
    run, checks = checked_run(interpreted_config)
    found = by_kernel(checks)
    # the student (2 clones of one clip per device, 7 tokens) and the teacher (33 tokens)
    # through the short attention and the MLP kernel; the decoder's one block width
    # and each as the tools call it, with trailing padding masked
    student, teacher = "student 2×7, 4 heads of 16", "teacher 1×33, 4 heads of 16"
    masked = ", padding masked"
    assert [c.where for c in found["attention"]] == [student, student + masked,
                                                     teacher, teacher + masked]  # fmt: skip
    # the lengths and backends the run's own step takes, traced
    traced = aot.lower_step(interpreted_config, jax.devices()).attention_choices
    assert traced == ((7, "pallas_short"), (33, "pallas_short"))
    assert [c.form for c in found["attention"]] == ["pallas_short"] * 4
    assert len(found["mlp"]) == 2 and len(found["decoder"]) == 1
    floor = 2 * 2**-7 + 64 * 2**-23  # bfloat16's rounding and float32's accumulation
    for c in checks:
        assert c.agrees, c
        # both forms round in bfloat16: neither is the float32 evaluation, both near it
        assert c.dtype == "bfloat16" and 1e-4 < c.xla_forward_error < 2**-7
        assert c.forward_bound == pytest.approx(4 * c.xla_forward_error + floor)
        assert 1e-4 < c.forward_error < c.forward_bound
        assert c.kernel_ms > 0 and c.xla_ms > 0
    # the student's passes are differentiated, the teacher's are not
    assert [c.gradient_error is None for c in found["mlp"]] == [False, True]
    assert selfcheck.dropped(run, checks) == []
    assert selfcheck.with_fallbacks(run, []) is run


def test_a_multi_slice_mesh_checks_one_devices_share_of_the_batch(interpreted_config, monkeypatch):
    """Two slices of four v5e devices (libtpu's abstract ones): a device's share is the
    batch over all eight, as the hybrid mesh's data axis spans the slices."""
    devices = aot.abstract_devices("v5e:2x2", num_slices=2)
    mesh = sharding.make_mesh(sharding.DATA_PARALLEL, devices, dcn_shape={"data": 2})
    run = config_lib.read(interpreted_config, hardware.HOST)
    run = dataclasses.replace(run, data=dataclasses.replace(run.data, batch_size=16))
    seen = []
    monkeypatch.setattr(selfcheck, "check_call", lambda call, *_: seen.append(call))
    selfcheck.check_run(run, mesh)
    student, teacher = (c.inputs[0].shape[0] for c in seen if c.kernel == "mlp")
    assert (student, teacher) == (16 // 8 * run.mask.clone_batch, 16 // 8)
    (decoder,) = (c.inputs[0].shape[0] for c in seen if c.kernel == "decoder")
    assert decoder == student


def test_a_run_on_xla_forms_only_checks_nothing(tmp_path):
    config = tiny_config(str(tmp_path), **{"execution.dtype": "bfloat16"})
    run, checks = checked_run(config)  # the CPU's forms: no kernel at all
    assert checks == [] and run.execution.mlp == "xla"
    assert not selfcheck.wanted(run)  # "auto" on a CPU
    assert selfcheck.wanted(dataclasses.replace(run, execution=run.execution, selfcheck="on"))


def test_every_compute_dtype_has_bounds_ordered_by_its_precision():
    for part in ("forward", "gradients"):
        floors = {d: selfcheck.bound(0.0, d, part) for d in DTYPES}  # an exact XLA form
        assert floors["float32"] < 1e-4 < floors["float16"] < floors["bfloat16"] < 0.1
        # a kernel may be a few times as far off as the XLA form itself
        assert selfcheck.bound(1e-2, "float16", part) > 4e-2


def unmasked(attend):
    """The short attention kernel with its key mask ignored."""
    return lambda qk, v, lam, mask, **options: attend(qk, v, lam, None, **options)


def test_a_kernel_that_ignores_the_padding_mask_is_caught(interpreted_config, monkeypatch):
    short = selfcheck.attention.short_attention
    monkeypatch.setattr(short, "fused_projection_attention",
                        unmasked(short.fused_projection_attention))  # fmt: skip
    run, checks = checked_run(interpreted_config)
    attention = by_kernel(checks)["attention"]
    assert [c.agrees for c in attention] == [True, False, True, False]
    assert all(c.forward_error > 0.05 for c in attention if not c.agrees)
    assert selfcheck.dropped(run, checks) == ["attention"]


def flipped_weight_gradient(backward):
    """The MLP kernel's backward with dW1's sign flipped."""

    def wrong(*args):
        dx, dw1, db1, dw2, db2 = backward(*args)
        return dx, -dw1, db1, dw2, db2

    return wrong


def refused_lowering(*args):
    """The MLP kernel's backward as a compiler that cannot lower it."""
    raise RuntimeError("Mosaic failed to compile TPU kernel: scoped Vmem limit exceeded")


def dropped_tail_block(forward):
    """The decoder kernel's forward with its last example's block never written."""
    return lambda *args: forward(*args).at[-1].set(0)


def test_a_wrong_sign_in_a_backward_is_caught(interpreted_config, monkeypatch):
    monkeypatch.setattr(mlp_kernel, "_backward", flipped_weight_gradient(mlp_kernel._backward))
    run, checks = checked_run(interpreted_config)
    found = by_kernel(checks)
    student, teacher = found["mlp"]
    assert student.forward_error < student.forward_bound  # the forward is right
    assert student.gradient_error > 1.0  # dW1 off by twice its size
    assert not student.agrees and teacher.agrees  # the teacher takes no gradient
    assert all(c.agrees for c in found["attention"] + found["decoder"])
    assert selfcheck.dropped(run, checks) == ["mlp"]


def test_a_dropped_tail_block_is_caught(interpreted_config, monkeypatch):
    monkeypatch.setattr(decoder_kernel, "_forward", dropped_tail_block(decoder_kernel._forward))
    run, checks = checked_run(interpreted_config)
    (decoder,) = by_kernel(checks)["decoder"]
    assert decoder.forward_error > 0.5 and not decoder.agrees
    assert selfcheck.dropped(run, checks) == ["decoder"]
    fallback = selfcheck.with_fallbacks(run, ["decoder"])
    assert fallback.execution.decoder_conv == "xla" and fallback.execution.mlp == "pallas"


def test_fastest_drops_a_kernel_slower_than_its_xla_form(interpreted_config):
    fastest = interpreted_config.copy_and_resolve_references()
    fastest.selfcheck = "fastest"
    run = config_lib.read(fastest, hardware.HOST)
    check = lambda kernel, ms: selfcheck.Check(
        kernel, "pallas", "", "bfloat16", 0.0, 0.0, 2e-2, 5e-2, kernel_ms=ms, xla_ms=1.0
    )
    checks = [check("mlp", 2.0), check("decoder", 0.5)]
    assert selfcheck.dropped(run, checks) == ["mlp"]
    assert selfcheck.dropped(dataclasses.replace(run, selfcheck="on"), checks) == []
    with pytest.raises(config_lib.ConfigError, match="selfcheck must be one of"):
        fastest.selfcheck = "sometimes"
        config_lib.read(fastest, hardware.HOST)


def final_params(workdir, config):
    state, task, _ = train_lib.train(config, workdir)
    return task, jax.tree.map(np.asarray, state.params)


@pytest.mark.train
def test_a_run_with_a_wrong_kernel_falls_back_and_trains_as_an_xla_run(
    data_dir, tmp_path, monkeypatch, caplog
):
    data = data_dir
    mlp_only = {
        "execution.interpret_kernels": True, "execution.dtype": "bfloat16",
        "num_train_steps": 3, "checkpoint_every": 3,
    }  # fmt: skip
    xla_task, xla = final_params(
        tmp_path / "xla", tiny_config(data, **mlp_only, **{"execution.mlp_impl": "xla"})
    )
    monkeypatch.setattr(mlp_kernel, "_backward", flipped_weight_gradient(mlp_kernel._backward))
    config = tiny_config(data, **mlp_only, **{"execution.mlp_impl": "pallas", "selfcheck": "on"})
    task, params = final_params(tmp_path / "checked", config)
    assert task.run.mlp == "xla" == xla_task.run.mlp  # fell back
    jax.tree.map(np.testing.assert_array_equal, params, xla)  # as the XLA run trained
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("mlp kernel (pallas) disagrees" in m and "uses the XLA form" in m for m in said)
    report = json.loads((tmp_path / "checked" / "selfcheck.json").read_text())
    assert report["dropped"] == ["mlp"] and report["device"] == "cpu"
    assert [r["agrees"] for r in report["checks"] if r["kernel"] == "mlp"] == [False, True]
    first = json.loads((tmp_path / "checked" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["selfcheck/mlp_agrees"] == 0.0 and first["selfcheck/dropped"] == 1.0
    assert np.isfinite(first["loss"])
    # A kernel that raises (as Mosaic does for a block it cannot lower, or a scoped-VMEM
    # refusal) counts as one that disagrees: recorded, dropped, and the run goes on.
    monkeypatch.setattr(mlp_kernel, "_backward", refused_lowering)
    task, params = final_params(tmp_path / "raised", config)
    assert task.run.mlp == "xla"
    jax.tree.map(np.testing.assert_array_equal, params, xla)
    report = json.loads((tmp_path / "raised" / "selfcheck.json").read_text())
    raised = [r for r in report["checks"] if r["kernel"] == "mlp" and not r["agrees"]]
    assert report["dropped"] == ["mlp"] and raised and raised[0]["forward_error"] is None
    assert "scoped Vmem limit exceeded" in raised[0]["error"]
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("mlp kernel (pallas) raised" in m and "uses the XLA form" in m for m in said)
    first = json.loads((tmp_path / "raised" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["selfcheck/mlp_agrees"] == 0.0 and np.isfinite(first["loss"])


@pytest.mark.subprocess
def test_launch_selfcheck_reports_and_exits_by_the_verdict(tmp_path):
    out = tmp_path / "report.json"
    # float16, which GPUs offer: bounds of its own (CPU interprets the kernels in it)
    kernels = {**KERNELS_INTERPRETED, "execution.dtype": "float16"}
    flags = [f"--config.{k}={v}" for k, v in kernels.items() if "attention" not in k]
    command = [
        sys.executable, str(ROOT / "launch" / "selfcheck.py"),
        "--config=configs/demo.py:model=tiny",
        "--config.data.target_frames=64", "--config.mask.clone_batch=2",
        "--config.pretrain.average_top_k_layers=2", *flags, f"--json={out}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mlp" in done.stdout and "agrees" in done.stdout
    report = json.loads(out.read_text())
    assert {r["kernel"] for r in report["checks"]} == {"mlp", "decoder"} and not report["dropped"]
    assert {r["dtype"] for r in report["checks"]} == {"float16"}
    assert all(r["forward_error"] < r["forward_bound"] < 2**-6 for r in report["checks"])
    bad = subprocess.run(
        [*command[:3], "--config.selfcheck=never"], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "selfcheck must be one of" in bad.stderr
