"""Test session setup: CPU only, with 8 simulated devices for the sharding tests.

XLA reads its flags once, so they are set here, before any test imports jax. The
session shares one persistent compilation cache, handed down to the training
processes the tests launch: the tiny configs compile the same programs many times.
"""

import os
import shutil
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="asda-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_sessionfinish(session, exitstatus):
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    if os.path.basename(cache).startswith("asda-jax-cache-"):
        shutil.rmtree(cache, ignore_errors=True)
