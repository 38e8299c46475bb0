"""Test setup: 8 fake CPU devices, configured before JAX is imported anywhere."""

import os

# Must happen before the first `import jax` in the test session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tpu extra (AOT compiles for TPU topologies) is installed in CI: keep libtpu from probing cloud
# metadata and printing start-up errors in every process (subprocesses inherit the variables).
from xlsr_jax.parallel.topology import quiet_libtpu  # noqa: E402  (sets variables only; no backend starts)

quiet_libtpu()
# Keep torch from oversubscribing the 2 CI cores while JAX runs beside it.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def cpu_devices():
    """The 8 fake CPU devices every sharding test runs on."""
    devices = jax.devices()
    assert len(devices) == 8, f"expected 8 fake CPU devices, got {len(devices)}"
    return devices
