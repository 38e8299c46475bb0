"""Multi-host runs started the way users start them: `xlsr-jax train` on every "host" (local processes).

Each process gets 4 fake CPU devices and joins through --coordinator-address/--num-processes/--process-id;
the reference is one process with 8 devices. Parameters are compared through the runs' own checkpoints.

The 2-process runs compile for themselves: JAX's persistent compilation cache keys a multi-process CPU
program differently on each process and only process 0 writes, so with the cache process 0 would load
while process 1 compiles, and the two would reach their first collective too far apart for Gloo's 30 s
rendezvous.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from compile_flags import FAST_COMPILE_FLAGS

from xlsr_jax.parallel.distributed import detect
from xlsr_jax.config import ConfigError
from xlsr_jax.train.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from xlsr_jax.cli import main; sys.exit(main())"]


def _env(devices: int, extra: dict | None = None) -> dict:
    env = {**os.environ, **(extra or {})}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAGS}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train_cmd(workdir, data_dir, steps, extra=()):
    overrides = {"data.dir": data_dir, "train.steps": steps, "train.eval_every": 0, "train.log_every": 1,
                 "data.num_buckets": 1, "train.checkpoint_every": 2, "mesh_preset": "''", "mesh.ici.data": 2,
                 "mesh.ici.fsdp": -1, "train.async_checkpointing": False, "train.keep_checkpoints": 5}
    return CLI + ["train", "--config", "experiments/pretrain_xlsr.py:smoke", "--workdir", str(workdir),
                  *[f"--config.{k}={v}" for k, v in overrides.items()], *extra]


def _start_pair(workdir, data_dir, steps, port):
    return [subprocess.Popen(_train_cmd(workdir, data_dir, steps) + [
        "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
        "--heartbeat-timeout", "10"], cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]


def _params(workdir, step=None):
    ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints")
    state = ckpt.read_state(step)
    ckpt.close()
    return jax.tree_util.tree_leaves(jax.device_get(state["params"])), int(state["step"])


def _max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, compile_cache):
    """One process, 8 devices, 10 steps: what every multi-process run must reproduce (at steps 2 and 10)."""
    workdir = tmp_path_factory.mktemp("one")
    run = subprocess.run(_train_cmd(workdir, data_dir, 10), cwd=ROOT, env=_env(8, compile_cache), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {step: _params(workdir, step)[0] for step in (2, 10)}


def _committed(workdir) -> list[int]:
    """Committed steps (a local save is renamed into place when it commits), ascending."""
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _wait_for_checkpoint_after(workdir, step, procs):
    deadline = time.time() + 300
    while time.time() < deadline and not any(s > step for s in _committed(workdir)):
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.5)
    if not any(s > step for s in _committed(workdir)):
        for p in procs:
            p.kill()
        pytest.fail(f"no checkpoint after step {step}: " + "\n".join(p.communicate()[1][-2000:] for p in procs))


def test_detect_reads_flags_then_environment():
    assert detect(environ={}).method == "single"
    spec = detect(environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4",
                           "JAX_PROCESS_ID": "3"})
    assert (spec.method, spec.coordinator_address, spec.num_processes, spec.process_id) == ("explicit", "10.0.0.2:1234",
                                                                                            4, 3)
    assert detect("h:1", 2, 0, environ={"JAX_PROCESS_ID": "1"}).process_id == 0  # flags win
    assert detect(environ={"SLURM_NTASKS": "8", "SLURM_JOB_ID": "77"}).method == "slurm"
    with pytest.raises(ConfigError, match="missing"):
        detect("h:1", environ={})
    with pytest.raises(ConfigError, match="must be in"):
        detect("h:1", 2, 2, environ={})


@pytest.mark.slow
def test_two_processes_equal_one_through_sigterm_a_killed_peer_and_reruns(tmp_path, data_dir, reference):
    """One run of 2 processes, stopped twice the ways hosts stop, rerun with the same command each time.

    2 processes x 4 devices train like 1 x 8; SIGTERM to one process saves the same step on both and
    exits cleanly; a SIGKILLed peer stops the other; each rerun resumes from the last committed
    checkpoint, and the run ends where the uninterrupted 1-process run does.
    """
    workdir = tmp_path / "run"
    procs = _start_pair(workdir, data_dir, 400, portpicker.pick_unused_port())
    _wait_for_checkpoint_after(workdir, 0, procs)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "preempted: saved and stopped" in out
    stopped = [int(out.split("preempted: saved and stopped at step ")[1].split(";")[0]) for out, _ in outs]
    assert stopped[0] == stopped[1] and 3 <= stopped[0] < 400, stopped
    assert _committed(workdir)[-1] == stopped[0]
    assert stopped[0] < 8, "the run went too far before SIGTERM to compare with the reference"
    # 2 processes x 4 devices, started through the command line, train like 1 process x 8.
    params, step = _params(workdir, 2)
    diff = _max_diff(params, reference[2])
    print("2 processes vs 1 after 2 steps: max param diff", diff)
    assert step == 2 and diff < 1e-5

    # The same command on both hosts: resumes where SIGTERM stopped it. SIGKILL one after its next checkpoint.
    procs = _start_pair(workdir, data_dir, 400, portpicker.pick_unused_port())
    _wait_for_checkpoint_after(workdir, stopped[0], procs)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        out, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    survivor_exit = time.time() - killed_at
    print(f"survivor exited {survivor_exit:.1f} s after its peer was killed, status {procs[0].returncode}")
    assert procs[0].returncode != 0 and survivor_exit < 60
    assert f"resumed from step {stopped[0]}" in out
    saved = Checkpointer(workdir / "checkpoints").all_steps()
    assert max(saved) > stopped[0] and max(saved) % 2 == 0, saved  # a killed run saves only on schedule
    assert max(saved) < 10, "the run went too far before the kill to compare with the reference"

    # Once more: resumes from the last committed checkpoint and finishes like the 1-process run.
    procs = _start_pair(workdir, data_dir, 10, portpicker.pick_unused_port())
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert f"resumed from step {max(saved)}" in outs[0][0]
    assert "2 process(es) x 4 cpu device(s)" in outs[0][1] and "per host 4" in outs[0][1]
    params, step = _params(workdir, 10)
    assert step == 10 and _max_diff(params, reference[10]) < 1e-5
