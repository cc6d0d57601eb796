"""The package as a wheel: every subpackage in it, its runtime stack declared, and a
run from the installed copy with the checkout off the path."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests import train_helpers as th

ROOT = th.ROOT


def build_wheel(out: Path) -> Path:
    """The wheel of the checkout's package, built from a copy (setuptools writes its
    build folders next to the sources)."""
    source = out / "source"
    shutil.copytree(
        ROOT / "asda_jax", source / "asda_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(source)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (wheel,) = out.glob("asda_jax-*.whl")
    return wheel


def installed_in_a_fresh_venv(wheel: Path, venv: Path) -> Path:
    """A new virtualenv holding the wheel; its dependencies are this environment's
    installed packages, listed by a .pth line (so no .pth of theirs, such as the
    checkout's editable install, is read there). Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def test_the_wheel_holds_every_module_and_declares_the_pinned_stack(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(path.relative_to(ROOT)) for path in (ROOT / "asda_jax").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    declared = {
        str(Requirement(line.split(":", 1)[1].strip()))
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    }
    pinned = {
        str(Requirement(line))
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert declared == pinned


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    return installed_in_a_fresh_venv(build_wheel(root / "dist"), root / "venv")


def installed_copy_of(script: str, folder: Path) -> Path:
    """launch/<script> copied away from the checkout, so that nothing of the checkout
    (tests/, benchmarks/, an uninstalled asda_jax) is on its path."""
    (folder / "launch").mkdir(parents=True)
    return Path(shutil.copy(ROOT / "launch" / script, folder / "launch" / script))


@pytest.mark.subprocess
def test_importing_every_module_of_the_wheel_leaves_other_libraries_settings_alone(
    installed_python, tmp_path
):
    """Every module imports from the installed copy, and none switches epath's gs://
    backend or fsspec's settings at import (the launchers do, by calling cli.start)."""
    imports = (
        "import importlib, os, pkgutil, fsspec, asda_jax; print(asda_jax.__file__); "
        "[importlib.import_module(m.name) "
        "for m in pkgutil.walk_packages(asda_jax.__path__, 'asda_jax.')]; "
        "print(os.environ.get('EPATH_USE_TF'), dict(fsspec.config.conf)); "
        "from asda_jax import cli; cli.start(); "
        "print(os.environ.get('EPATH_USE_TF'), dict(fsspec.config.conf))"
    )
    done = subprocess.run(
        [installed_python, "-c", imports], cwd=tmp_path, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "EPATH_USE_TF"}, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    where, imported, started = done.stdout.strip().splitlines()[-3:]
    assert where.startswith(str(installed_python.parents[1]))
    assert imported == "None {}"
    assert started == "false {'gs': {'use_listings_cache': False}}"


@pytest.mark.subprocess
def test_a_demo_run_works_from_the_installed_wheel(installed_python, tmp_path):
    data = tmp_path / "data"
    run = subprocess.run(
        [installed_python, installed_copy_of("train.py", tmp_path),
         f"--config={ROOT / 'configs' / 'demo.py'}", f"--workdir={tmp_path / 'run'}",
         *th.tiny_flags(str(data), num_train_steps=2, checkpoint_every=2)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(th.losses(tmp_path / "run")) == [1, 2]


@pytest.mark.subprocess
@pytest.mark.compile
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_the_installed_wheel_compiles_a_preset_for_its_tpu(installed_python, tmp_path):
    """launch/compile.py reads compiled HLO with asda_jax.hlo: the wheel alone has it."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [installed_python, installed_copy_of("compile.py", tmp_path),
         f"--config={ROOT / 'configs' / 'finetune_as20k.py'}:model=tiny,mesh=v5e-1",
         "--config.data.target_frames=256", "--config.eval_data.target_frames=256",
         "--config.data.batch_size=8", f"--json={report}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finetune step for v5e:1x1" in done.stdout
    counts = json.loads(report.read_text())
    assert counts["topology"] == "v5e:1x1"
    assert counts["custom_calls"]["tpu_custom_call"] > 0  # the Pallas kernels, read from the HLO
