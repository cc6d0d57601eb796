"""Test session setup: CPU only, with 8 simulated devices for the sharding tests.

XLA reads its flags once, so they are set here, before any test imports jax. The
session shares one persistent compilation cache, handed down to the training
processes the tests launch: the tiny configs compile the same programs many times.
Runs in this process use the launcher's one OpenBLAS thread (set before NumPy loads),
so their host spectrograms, and losses, equal those of the runs ``launch/train.py``
starts bit for bit.
"""

import os
import shutil
import sys
import tempfile

import pytest

from asda_jax import launch_env

assert "numpy" not in sys.modules, "conftest must set OpenBLAS's thread count before NumPy loads"
os.environ.update(launch_env.with_one_blas_thread(dict(os.environ)))

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # xdist workers inherit the controller's
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="asda-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests name configs/…

from asda_jax import storage  # noqa: E402 (NumPy loads with it, after the thread count is set)

storage.configure()  # as the launchers do, before any path is used (the GCS server's tests)


@pytest.fixture(scope="session")
def gcs_bucket():
    """``gs://<bucket>`` on a GCS-API server on 127.0.0.1, this process and the ones
    it starts pointed at it. One server per session: gcsfs keeps one client per
    process, made with the first endpoint it sees. Tests write under names of their own."""
    from asda_jax.testing import gcs_server

    with gcs_server.serving() as bucket:
        yield bucket


@pytest.fixture(scope="module")
def encoder_export(tmp_path_factory):
    """A randomly initialised tiny encoder, exported for a 128-frame input with
    AudioSet's normalisation (for the tools' tests)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from asda_jax import audio, checkpoints
    from asda_jax import model as model_lib

    cfg = model_lib.preset("tiny")
    variables = model_lib.Encoder(cfg).init(jax.random.key(0), jnp.zeros((1, 128, 128)))
    path = tmp_path_factory.mktemp("encoder") / "export"
    params = {"encoder": nn.meta.unbox(variables)["params"]}
    norm = audio.NORM_STATS["audioset"]
    checkpoints.export(path, params, cfg, kind="pretrain", target_frames=128, norm=norm)
    return path


# The modules that take longest, longest first (measured on one worker). `make test` hands
# whole modules to two workers in collection order; starting the long ones first keeps one
# worker from running a long module alone at the end.
LONGEST_MODULES_FIRST = (
    "test_finetune", "test_train", "test_multihost", "test_cloud_storage", "test_model",
    "test_selfcheck", "test_aot", "test_longform", "test_interop", "test_objectives",
    "test_hf_export", "test_packaging", "test_hf_weights", "test_streaming", "test_attention",
    "test_notebook",
)  # fmt: skip


def module_rank(item) -> int:
    name = item.path.stem
    return (
        LONGEST_MODULES_FIRST.index(name)
        if name in LONGEST_MODULES_FIRST
        else len(LONGEST_MODULES_FIRST)
    )


def pytest_collection_modifyitems(items):
    items.sort(key=module_rank)  # stable: a module's tests keep their order


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the cache is shared, the controller removes it
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    if os.path.basename(cache).startswith("asda-jax-cache-"):
        shutil.rmtree(cache, ignore_errors=True)
