"""Test session setup: CPU only, with 8 simulated devices for the sharding tests.

XLA reads its flags once, so they are set here, before any test imports jax.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
