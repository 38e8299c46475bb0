"""SIGTERM preemption of a single training process, in a subprocess (multi-process runs: test_multihost_cli.py)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from compile_flags import FAST_COMPILE_FLAGS


ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "train_worker.py"


def _env(**extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS  # the workers set their own device counts
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(tmp_path, data_dir, compile_cache):
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(WORKER), str(workdir), str(data_dir), "400"]
    env = _env(**compile_cache)  # the resumed process loads the program the first one compiled
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted=True" in out
    stopped_at = int(out.strip().split("done at step ")[1].split()[0])
    assert 3 <= stopped_at < 400
    assert (workdir / "checkpoints" / str(stopped_at)).is_dir()
    # A fresh process resumes from exactly there.
    resumed = subprocess.run(cmd[:-1] + [str(stopped_at + 2)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stdout
    assert f"done at step {stopped_at + 2}" in resumed.stdout
