"""Test setup: 8 fake CPU devices, configured before JAX is imported anywhere."""

import os
import shutil
import subprocess
import time
import urllib.request

# Must happen before the first `import jax` in the test session (subprocesses inherit the flags).
from compile_flags import FAST_COMPILE_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tpu extra (AOT compiles for TPU topologies) is installed in CI: keep libtpu from probing cloud
# metadata and printing start-up errors in every process (subprocesses inherit the variables).
from xlsr_jax.parallel.topology import quiet_libtpu  # noqa: E402  (sets variables only; no backend starts)

quiet_libtpu()
# Keep torch from oversubscribing the 2 CI cores while JAX runs beside it.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import jax
import portpicker
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def users_matmul_precision():
    """JAX's default matmul precision, as a user's process has it, instead of the session's "highest".

    For TPU targets (`xlsr-jax fit`) "highest" expands every float32 matmul into six bfloat16 passes:
    another program than users compile (more collectives) and 4x the compile time (102 s against 26 s
    for the smoke step on v5e-8).
    """
    with jax.default_matmul_precision(None):
        yield


@pytest.fixture(scope="session")
def cpu_devices():
    """The 8 fake CPU devices every sharding test runs on."""
    devices = jax.devices()
    assert len(devices) == 8, f"expected 8 fake CPU devices, got {len(devices)}"
    return devices


@pytest.fixture(scope="session")
def compile_cache_dir(tmp_path_factory):
    """One JAX persistent compilation cache for the whole test run, shared by the xdist workers (empty at
    its start): each worker's base temp is `pytest-N/popen-gwK`, the cache lives in `pytest-N`."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / "jax_compile_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module", autouse=True)
def session_compile_cache(request, compile_cache_dir):
    """JAX's persistent compilation cache for every module, unless it sets `PERSISTENT_COMPILE_CACHE = False`.

    The suite compiles the same programs (the smoke and tiny train steps, state initialization, the
    evaluation step) in many modules and processes; on this 2-core machine compiling is most of a test's
    time (the tiny train step: ~35 s to compile, 0.1 s to run). A program (same HLO, devices and options)
    that takes over a second to compile is now compiled once per test run and loaded after that: what
    runs is the same executable. (Caching every compile, as `compile_cache` does, costs more than it saves
    in modules that run eager JAX ops: each op is a program written to the cache.) A size limit turns on
    jax's file lock, so that two workers never read an entry while the other writes it.
    """
    if not getattr(request.module, "PERSISTENT_COMPILE_CACHE", True):
        yield None
        return
    from jax.experimental.compilation_cache import compilation_cache as cc

    previous = jax.config.jax_compilation_cache_max_size
    jax.config.update("jax_compilation_cache_max_size", 8 << 30)
    cc.set_cache_dir(str(compile_cache_dir))
    yield compile_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_compilation_cache_max_size", previous)
    cc.reset_cache()


@pytest.fixture(scope="module")
def compile_cache(compile_cache_dir, session_compile_cache):
    """For modules that start the same training program many times: every compile is cached, also those
    under a second.
    Yields the environment variables that give a subprocess the same cache (single-process runs only: on
    CPU each process of a multi-process run keys the same program differently and only process 0 writes,
    so the processes would drift apart, see test_multihost_cli.py)."""
    assert session_compile_cache is not None, "this module turned the compilation cache off"
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield {"JAX_COMPILATION_CACHE_DIR": str(compile_cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30)}
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The embedded corpus prepared (11 languages; 176 train and 44 dev clips), once per test process.
    Tests share it: they read it and write nowhere in it."""
    from data_pipelines.corpus import corpus_dir
    from data_pipelines.ingest.prepare import prepare

    out = tmp_path_factory.mktemp("corpus") / "prepared"
    prepare(corpus_dir(), out, workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def emulator():
    """A local Cloud Storage emulator with a bucket named `bucket`: (its URL, the environment that points
    google-cloud-storage, gcsfs, tensorstore and Beam's GCS file system at it)."""
    if shutil.which("gcp-storage-emulator") is None:
        pytest.fail("gcp-storage-emulator is missing: it is part of the test extra")
    port = portpicker.pick_unused_port()
    proc = subprocess.Popen(["gcp-storage-emulator", "start", "--port", str(port), "-H", "127.0.0.1",
                             "--default-bucket", "bucket", "--in-memory"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/bucket", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "GOOGLE_CLOUD_PROJECT": "test"}
    yield url, env
    proc.terminate()
    proc.wait(timeout=10)
