"""`xlsr-jax launch tpu|xpk|slurm`: render (and run) the commands a team types to start a pod job.

Every target runs the same `xlsr-jax train --config ... --workdir ...` on every host; the job finds
its peers by itself (Cloud TPU metadata, xpk's multi-slice environment, or the coordinator taken
from the first SLURM node). The mesh is checked against the accelerator type before anything is
created. GPU jobs get `GPU_ENV` (XLA's latency-hiding scheduler and pipelined FSDP collectives,
NCCL settings), defined here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence

from xlsr_jax.config import ConfigError

# XLA and NCCL settings for H100 clusters (the ones MaxText and NVIDIA's JAX-Toolbox recommend for
# FSDP training): overlap collectives with compute, pipeline the per-layer all-gathers and
# reduce-scatters of the layer scan, and combine small collectives.
GPU_XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
)
GPU_ENV = {
    "XLA_FLAGS": " ".join(GPU_XLA_FLAGS),
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
    "NCCL_NVLS_ENABLE": "0",
    "NCCL_DEBUG": "WARN",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}
DEFAULT_PORT = 8476


@dataclasses.dataclass
class Plan:
    """What a launch does: shell commands in order, or a script file and the command that submits it."""

    commands: list[list[str]]
    script: str | None = None
    script_name: str | None = None

    def render(self) -> str:
        parts = []
        if self.script is not None:
            parts.append(f"# {self.script_name}\n{self.script}")
        parts += [shlex.join(cmd) for cmd in self.commands]
        return "\n".join(parts)


def train_command(config: str, workdir: str, overrides: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    return ["xlsr-jax", "train", "--config", config, "--workdir", workdir, *overrides, *extra]


def check_tpu_mesh(experiment, accelerator_type: str, num_slices: int) -> str:
    """Raise ConfigError unless the experiment's mesh covers `accelerator_type` x `num_slices`; returns a summary."""
    from xlsr_jax.parallel.mesh import check_mesh_covers
    from xlsr_jax.parallel.topology import parse_topology

    topology = parse_topology(accelerator_type, num_slices)
    check_mesh_covers(experiment.mesh_preset, experiment.mesh, topology.chips_per_slice, num_slices,
                      f"{accelerator_type}{f' x {num_slices} slices' if num_slices > 1 else ''}")
    return topology.describe()


def tpu_plan(name: str, zone: str, accelerator_type: str, config: str, workdir: str, overrides: Sequence[str],
             num_slices: int = 1, runtime_version: str = "tpu-ubuntu2204-base", project: str | None = None,
             package: str = "xlsr-jax[tpu]", spot: bool = False) -> Plan:
    """TPU VM (one slice) or queued resource (several), the package on every worker, then train on all of them."""
    common = ["--zone", zone] + (["--project", project] if project else [])
    if num_slices == 1:
        create = ["gcloud", "compute", "tpus", "tpu-vm", "create", name, *common,
                  "--accelerator-type", accelerator_type, "--version", runtime_version] + (["--spot"] if spot else [])
        nodes = [name]
    else:
        create = ["gcloud", "compute", "tpus", "queued-resources", "create", name, *common,
                  "--node-prefix", name, "--node-count", str(num_slices), "--accelerator-type", accelerator_type,
                  "--runtime-version", runtime_version] + (["--spot"] if spot else [])
        nodes = [f"{name}-{i}" for i in range(num_slices)]
    commands = [create]
    local_file, remote_spec = _experiment_paths(config)
    remote = (f"pip install {shlex.quote(package)} && mkdir -p experiments && "
              + shlex.join(train_command(remote_spec, workdir, overrides)))
    for node in nodes:
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", local_file, f"{node}:experiments/", *common,
                         "--worker=all"])
    for node in nodes:  # the same command on every worker of every slice
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *common, "--worker=all",
                         "--command", remote])
    return Plan(commands)


def _experiment_paths(config: str) -> tuple[str, str]:
    """(local experiment file, the `--config` spec on a worker where it is copied into experiments/)."""
    import pathlib

    path, sep, preset = config.partition(":")
    return path, f"experiments/{pathlib.Path(path).name}" + (f":{preset}" if sep else "")


def xpk_plan(cluster: str, workload: str, tpu_type: str, config: str, workdir: str, overrides: Sequence[str],
             num_slices: int = 1, base_image: str = "python:3.11", project: str | None = None,
             zone: str | None = None, package: str = "xlsr-jax[tpu]") -> Plan:
    """One `xpk workload create` (GKE): xpk builds an image of this directory (experiments/ included) on
    `base_image` and runs the command on every host of every slice."""
    command = f"pip install {shlex.quote(package)} && " + shlex.join(train_command(config, workdir, overrides))
    cmd = ["xpk", "workload", "create", "--cluster", cluster, "--workload", workload, "--tpu-type", tpu_type,
           "--num-slices", str(num_slices), "--base-docker-image", base_image, "--command", command]
    cmd += (["--project", project] if project else []) + (["--zone", zone] if zone else [])
    return Plan([cmd])


def slurm_plan(job_name: str, nodes: int, gpus_per_node: int, config: str, workdir: str, overrides: Sequence[str],
               partition: str | None = None, time_limit: str = "24:00:00", port: int = DEFAULT_PORT,
               setup: str = "") -> Plan:
    """An sbatch script: one task per node, the coordinator on the first node, GPU_ENV exported."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={gpus_per_node}", "#SBATCH --exclusive",
             f"#SBATCH --time={time_limit}", f"#SBATCH --output={job_name}-%j.out"]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["set -euo pipefail"] + ([setup] if setup else [])
    lines += [f"export {k}={shlex.quote(v)}" for k, v in GPU_ENV.items()]
    lines += ['COORDINATOR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              "# Every task runs the same command; the process id is the task's rank (one per node)."]
    train = shlex.join(train_command(config, workdir, overrides))
    lines.append(f"srun --ntasks={nodes} --ntasks-per-node=1 bash -c '{train} "
                 f"--coordinator-address \"$COORDINATOR:{port}\" --num-processes {nodes} "
                 "--process-id \"$SLURM_PROCID\"'")
    script = "\n".join(lines) + "\n"
    name = f"{job_name}.sbatch"
    return Plan([["sbatch", name]], script=script, script_name=name)


def check_gpu_mesh(experiment, nodes: int, gpus_per_node: int) -> str:
    """Raise ConfigError unless the mesh covers `nodes` x `gpus_per_node` (ICI within a node, DCN across)."""
    from xlsr_jax.parallel.mesh import check_mesh_covers

    check_mesh_covers(experiment.mesh_preset, experiment.mesh, gpus_per_node, nodes,
                      f"{nodes} node(s) x {gpus_per_node} GPUs")
    return f"{nodes} node(s) x {gpus_per_node} GPUs"


def run_plan(plan: Plan) -> int:
    """Write the script (if any) and run the commands in order; stops at the first failure."""
    import pathlib
    import subprocess

    if plan.script is not None:
        pathlib.Path(plan.script_name).write_text(plan.script)
    for cmd in plan.commands:
        code = subprocess.call(cmd)
        if code:
            raise ConfigError(f"`{shlex.join(cmd)[:200]}` exited with status {code}")
    return 0
