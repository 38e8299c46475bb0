"""`xlsr-jax launch`: what each target renders, that it runs it, and that a wrong mesh is refused first."""

import os
import pathlib
import shlex

import pytest

from xlsr_jax import launch
from xlsr_jax.cli import main

CONFIG = "experiments/pretrain_xlsr.py:xlsr_1b"


def _launch(capsys, *args):
    code = main(["launch", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tpu_single_slice_renders_create_copy_and_train_on_every_worker(capsys):
    code, out, _ = _launch(capsys, "tpu", "--config", CONFIG, "--workdir", "gs://b/run", "--name", "w2v",
                           "--zone", "us-east5-a", "--accelerator-type", "v5p-128", "--config.mesh_preset=v5p-128",
                           "--config.data.dir=/mnt/data", "--dry-run")
    assert code == 0
    lines = [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]
    assert lines[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "w2v"]
    assert "--accelerator-type" in lines[0] and "v5p-128" in lines[0]
    assert lines[1][4] == "scp" and lines[1][5] == "experiments/pretrain_xlsr.py" and "--worker=all" in lines[1]
    ssh = lines[2]
    assert ssh[4] == "ssh" and "--worker=all" in ssh
    remote = shlex.split(ssh[ssh.index("--command") + 1].split(" && ")[-1])
    assert remote[:6] == ["xlsr-jax", "train", "--config", "experiments/pretrain_xlsr.py:xlsr_1b", "--workdir",
                          "gs://b/run"]
    assert "--config.mesh_preset=v5p-128" in remote and "--config.data.dir=/mnt/data" in remote
    assert "pip install 'xlsr-jax[tpu]'" in ssh[ssh.index("--command") + 1]


def test_tpu_multislice_uses_a_queued_resource_and_every_slice(capsys):
    code, out, _ = _launch(capsys, "tpu", "--config", CONFIG, "--workdir", "gs://b/run", "--name", "ms",
                           "--zone", "us-east5-a", "--accelerator-type", "v5p-128", "--num-slices", "2",
                           "--config.mesh_preset=2x v5p-128", "--dry-run")
    assert code == 0
    assert "queued-resources create ms" in out and "--node-count 2" in out
    assert out.count("tpu-vm ssh ms-0") == 1 and out.count("tpu-vm ssh ms-1") == 1


def test_xpk_renders_one_workload(capsys):
    code, out, _ = _launch(capsys, "xpk", "--config", CONFIG, "--workdir", "gs://b/run", "--name", "job1",
                           "--cluster", "c1", "--accelerator-type", "v5e-256", "--num-slices", "2",
                           "--config.mesh_preset=2x v5e-256", "--dry-run")
    assert code == 0
    cmd = shlex.split([line for line in out.splitlines() if line.startswith("xpk")][0])
    assert cmd[:3] == ["xpk", "workload", "create"]
    assert cmd[cmd.index("--tpu-type") + 1] == "v5e-256" and cmd[cmd.index("--num-slices") + 1] == "2"
    assert "xlsr-jax train --config experiments/pretrain_xlsr.py:xlsr_1b" in cmd[cmd.index("--command") + 1]


def test_slurm_script_has_one_task_per_node_and_the_first_node_as_coordinator(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    root = pathlib.Path(__file__).resolve().parents[1]
    (tmp_path / "experiments" / "pretrain_xlsr.py").write_text((root / "experiments/pretrain_xlsr.py").read_text())
    code, out, _ = _launch(capsys, "slurm", "--config", CONFIG, "--workdir", "/shared/run", "--name", "h100",
                           "--nodes", "4", "--config.mesh_preset=gpu-4x8", "--dry-run")
    assert code == 0
    assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --gpus-per-node=8" in out
    assert 'COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in out
    assert "--num-processes 4" in out and '--process-id "$SLURM_PROCID"' in out
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in out  # launch.GPU_ENV, exported once
    assert out.strip().endswith("sbatch h100.sbatch")
    assert not (tmp_path / "h100.sbatch").exists()  # dry run writes nothing


@pytest.mark.parametrize("args,message", [
    (["tpu", "--accelerator-type", "v5e-8", "--zone", "z", "--config.mesh_preset=v5e-256"],
     "spans 256 chips per slice but v5e-8 has 8"),
    (["xpk", "--cluster", "c", "--accelerator-type", "v5p-128", "--num-slices", "2", "--config.mesh_preset=v5p-128"],
     "joins 1 slice(s) over DCN"),
    (["slurm", "--nodes", "2", "--config.mesh_preset=gpu-4x8"], "joins 4 slice(s) over DCN but 2 node(s)"),
    (["tpu", "--accelerator-type", "v5e-8", "--config.mesh_preset=v5e-8"], "needs --zone"),
])
def test_a_mismatched_mesh_is_refused_before_anything_runs(capsys, monkeypatch, args, message):
    ran = []
    monkeypatch.setattr(launch, "run_plan", lambda plan: ran.append(plan) or 0)
    code, _, err = _launch(capsys, *args[:1], "--config", CONFIG, "--workdir", "w", "--name", "n", *args[1:])
    assert code == 2 and message in err and not ran


def test_without_dry_run_the_commands_run_in_order(capsys, tmp_path, monkeypatch):
    log = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    code, _, _ = _launch(capsys, "tpu", "--config", CONFIG, "--workdir", "gs://b/run", "--name", "w2v",
                         "--zone", "z", "--accelerator-type", "v5p-128", "--config.mesh_preset=v5p-128")
    calls = log.read_text().splitlines()
    assert code == 0 and len(calls) == 3
    assert calls[0].startswith("compute tpus tpu-vm create w2v") and " ssh w2v " in calls[2]
