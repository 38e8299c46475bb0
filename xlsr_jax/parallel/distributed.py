"""Multi-host start-up: the same command on every host joins one `jax.distributed` job.

How the job is found, in order:
1. explicit: `--coordinator-address HOST:PORT --num-processes N --process-id I`, or the same from
   `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
2. SLURM with more than one task (`SLURM_NTASKS`): JAX reads the job's variables itself;
3. a Cloud TPU VM (`/dev/accel*` or `/dev/vfio/*` present): JAX asks the TPU metadata for the workers;
4. otherwise a single process.

A dead peer must not leave the others waiting in a collective forever: the coordination service's
heartbeat timeout (`heartbeat_timeout_s`) bounds how long survivors take to notice and exit non-zero.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os

from xlsr_jax.config import ConfigError

log = logging.getLogger(__name__)

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
DEFAULT_HEARTBEAT_TIMEOUT_S = 30  # JAX's default is 100 s; a pod job should fail (and restart) sooner


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How this process joins the job; `method` is "explicit", "slurm", "tpu-vm" or "single"."""

    method: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def detect(coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, environ=None) -> DistributedSpec:
    """Decide how to start from flags first, then the environment; raises ConfigError on a partial spec."""
    env = os.environ if environ is None else environ
    address = coordinator_address or env.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _int_env(env, ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else _int_env(env, ENV_PROCESS_ID)
    given = {"--coordinator-address": address, "--num-processes": count, "--process-id": index}
    if any(v is not None for v in given.values()):
        missing = [name for name, v in given.items() if v is None]
        if missing:
            raise ConfigError(f"multi-host start-up needs all of --coordinator-address, --num-processes and "
                              f"--process-id (or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); "
                              f"missing {missing}")
        if ":" not in address:
            raise ConfigError(f"--coordinator-address {address!r} must be HOST:PORT")
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"--process-id {index} must be in [0, {count}) for --num-processes {count}")
        return DistributedSpec("explicit", address, count, index)
    if _int_env(env, "SLURM_NTASKS", 1) > 1 and env.get("SLURM_JOB_ID"):
        return DistributedSpec("slurm")
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return DistributedSpec("tpu-vm")
    return DistributedSpec("single")


def _int_env(env, name: str, default: int | None = None) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ConfigError(f"{name}={value!r} is not an integer") from e


def initialize(spec: DistributedSpec, heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               initialization_timeout_s: int = 300) -> None:
    """Join the job `spec` describes (a no-op for a single process); call before anything touches devices."""
    import jax

    if spec.method == "single":
        return
    kwargs = {"heartbeat_timeout_seconds": heartbeat_timeout_s, "initialization_timeout": initialization_timeout_s}
    if spec.method == "explicit":
        if spec.num_processes == 1:
            return
        kwargs.update(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                      process_id=spec.process_id)
    log.info("joining the jax.distributed job (%s)", spec.method)
    jax.distributed.initialize(**kwargs)


def describe_job(mesh, global_batch: int) -> str:
    """One line about the job: processes, devices per process, slices, mesh, global and per-host batch."""
    import jax

    slices = len({getattr(d, "slice_index", 0) for d in jax.devices()})
    shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return (f"{jax.process_count()} process(es) x {jax.local_device_count()} {jax.devices()[0].platform} "
            f"device(s), {slices} slice(s), mesh ({shape}), global batch {global_batch}, "
            f"per host {global_batch // jax.process_count()}")
