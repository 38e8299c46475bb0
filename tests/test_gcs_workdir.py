"""A workdir in Cloud Storage (gs://), against a local emulator: checkpoints, metrics, TensorBoard, resume, export.

What reaches the emulator: Orbax/tensorstore (checkpoint arrays), gcsfs through etils.epath (checkpoint
metadata, grain's data position, metrics.jsonl, vocab.json, TensorBoard events).
Not covered here: tensorstore's OCDBT layout (the default on real buckets) reads the `x-goog-generation`
header that gcp-storage-emulator does not send ("Malformed StorageGeneration"), so these runs use
`train.checkpoint_ocdbt=False`.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
from compile_flags import FAST_COMPILE_FLAGS

from xlsr_jax.model_dir import load_model_dir
from xlsr_jax.train.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from xlsr_jax.cli import main; sys.exit(main())"]
OVERRIDES = ["--config.train.checkpoint_every=2", "--config.train.eval_every=0", "--config.train.log_every=1",
             "--config.data.num_buckets=1", "--config.train.checkpoint_ocdbt=False",
             "--config.train.async_checkpointing=False"]


def _objects(url, prefix):
    with urllib.request.urlopen(f"{url}/storage/v1/b/bucket/o?prefix={prefix}") as r:
        return [item["name"] for item in json.load(r).get("items", [])]


def _read(url, name):
    with urllib.request.urlopen(f"{url}/download/storage/v1/b/bucket/o/{name.replace('/', '%2F')}?alt=media") as r:
        return r.read().decode()


def _committed(url):
    """The committed checkpoint steps in gs://bucket/run, ascending."""
    return sorted(int(n.split("/")[2]) for n in _objects(url, "run/checkpoints/")
                  if n.endswith("/commit_success.txt") and n.count("/") == 3)


def _run(workdir, steps, env, wait=True):
    cmd = CLI + ["train", "--config", "experiments/pretrain_xlsr.py:smoke", "--workdir", str(workdir),
                 f"--config.train.steps={steps}", *OVERRIDES]
    full_env = {**os.environ, **env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE_FLAGS}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_gs_workdir_checkpoints_resumes_after_kill_and_exports(tmp_path, emulator, compile_cache):
    url, gcs = emulator
    local = tmp_path / "local"
    _run(local, 4, compile_cache)  # the uninterrupted reference, on local disk
    env = {**gcs, **compile_cache}  # the runs are one program: compiled once
    proc = _run("gs://bucket/run", 400, env, wait=False)
    deadline = time.time() + 300
    # Buckets have no rename: Orbax marks a committed step with commit_success.txt (a torn one is ignored).
    while time.time() < deadline and not _objects(url, "run/checkpoints/2/commit_success.txt"):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # before it commits step 4
    proc.wait(timeout=60)
    steps = _committed(url)
    assert steps and steps[-1] < 4, steps
    resumed = _run("gs://bucket/run", 4, env)
    assert f"resumed from step {steps[-1]} in gs://bucket/run/checkpoints" in resumed.stdout
    assert _committed(url)[-1] == 4
    names = _objects(url, "run/")
    assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names)
    logged = [json.loads(line)["step"] for line in _read(url, "run/metrics.jsonl").splitlines()]
    assert logged[-1] == 4 and set(range(steps[-1] + 1, 5)) <= set(logged)

    export = subprocess.run(CLI + ["export", "--workdir", "gs://bucket/run", "--output", str(tmp_path / "model")],
                            cwd=ROOT, env={**os.environ, **env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                            text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "model" / "params").is_dir()
    # The export is the bucket's newest checkpoint (step 4, resumed from the bucket): equal to the
    # uninterrupted run on local disk, bit for bit.
    _, head, exported = load_model_dir(tmp_path / "model")
    reference = Checkpointer(local / "checkpoints").read_state(4)
    assert head == "pretraining"
    jax.tree_util.tree_map(np.testing.assert_array_equal, exported, jax.device_get(reference["params"]))
