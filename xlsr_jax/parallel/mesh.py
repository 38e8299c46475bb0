"""Device meshes from a config: axes (data, fsdp, tensor), ICI sizes and DCN (multi-slice) sizes.

    mesh: {ici: {data: -1, fsdp: 8, tensor: 1}, dcn: {data: 2, fsdp: 1, tensor: 1}}

-1 in an ICI size means "whatever the devices of one slice leave"; at most one -1 per level.
Validation runs before anything compiles and says what to change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

from xlsr_jax.config import ConfigError, Wav2Vec2Config

AXES = ("data", "fsdp", "tensor")

# A data/fsdp/tensor split per machine shape (ICI within a slice, DCN across slices). FSDP over a
# slice is the default for 300M-2B encoders (parameters and Adam state sharded, activations
# batch-sharded); tensor parallelism only where per-chip memory is tight (v5e: 16 GB HBM);
# slices are joined with data parallelism over DCN.
MESH_PRESETS = {
    # TPU (chips per slice)
    "v4-8": {"ici": {"data": 1, "fsdp": 4, "tensor": 1}, "dcn": {}},  # 4 chips (megacore)
    "v4-128": {"ici": {"data": 1, "fsdp": 64, "tensor": 1}, "dcn": {}},
    "v5e-8": {"ici": {"data": 1, "fsdp": 8, "tensor": 1}, "dcn": {}},
    "v5e-256": {"ici": {"data": 1, "fsdp": 64, "tensor": 4}, "dcn": {}},
    "v5p-128": {"ici": {"data": 1, "fsdp": 64, "tensor": 1}, "dcn": {}},
    # fsdp 128, not 256: xlsr_2b's hidden size 1920 does not split 256 ways.
    "v6e-256": {"ici": {"data": 2, "fsdp": 128, "tensor": 1}, "dcn": {}},
    "2x v5p-128": {"ici": {"data": 1, "fsdp": 64, "tensor": 1}, "dcn": {"data": 2}},
    "2x v6e-256": {"ici": {"data": 2, "fsdp": 128, "tensor": 1}, "dcn": {"data": 2}},
    "2x v5e-256": {"ici": {"data": 1, "fsdp": 64, "tensor": 4}, "dcn": {"data": 2}},
    # GPU (NVLink within a node = ICI, InfiniBand across nodes = DCN)
    "gpu-1x8": {"ici": {"data": 1, "fsdp": 8, "tensor": 1}, "dcn": {}},
    "gpu-4x8": {"ici": {"data": 1, "fsdp": 8, "tensor": 1}, "dcn": {"data": 4}},
    # CPU tests and smoke runs
    "cpu": {"ici": {"data": -1, "fsdp": 1, "tensor": 1}, "dcn": {}},
}


def resolve_mesh_config(mesh_preset: str, mesh: Mapping) -> dict:
    """The mesh a run uses: the named preset when set, else the explicit `mesh` section."""
    if mesh_preset:
        if mesh_preset not in MESH_PRESETS:
            raise ConfigError(f"unknown mesh_preset {mesh_preset!r}; choose one of {sorted(MESH_PRESETS)} "
                              "or set mesh_preset='' and mesh.ici/mesh.dcn")
        return {**MESH_PRESETS[mesh_preset], "num_devices": mesh.get("num_devices", 0)}
    return {"ici": dict(mesh.get("ici", {})), "dcn": dict(mesh.get("dcn", {})), "num_devices": mesh.get("num_devices", 0)}


def preset_platform(mesh_preset: str) -> str | None:
    """"gpu" or "tpu" for a GPU or TPU preset (`gpu-4x8`, `v5p-128`, `2x v5e-256`), None otherwise; the
    package extra of the same name gives JAX that platform's devices."""
    if mesh_preset.startswith("gpu-"):
        return "gpu"
    if mesh_preset in MESH_PRESETS and mesh_preset.split()[-1].startswith("v"):
        return "tpu"
    return None


def build_run_mesh(mesh_preset: str, mesh: Mapping, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """The mesh of a run (`resolve_mesh_config` + `build_mesh`). When a GPU or TPU preset does not fit the
    devices and JAX sees another platform, the error says where to run it and with which install."""
    devices = list(devices if devices is not None else jax.devices())
    try:
        return build_mesh(resolve_mesh_config(mesh_preset, mesh), devices)
    except ConfigError as e:
        wanted, seen = preset_platform(mesh_preset), devices[0].platform
        if wanted is None or seen == wanted:
            raise
        kind = wanted.upper()
        raise ConfigError(f"{e}. mesh_preset {mesh_preset!r} is for {kind}s but JAX sees {len(devices)} {seen} "
                          f"device(s): run it where JAX sees {kind}s (on {kind} machines, "
                          f"pip install 'xlsr-jax[{wanted}]')") from None


def check_mesh_covers(mesh_preset: str, mesh: Mapping, devices_per_slice: int, num_slices: int, where: str) -> None:
    """Raise ConfigError (before anything compiles or is created) unless the mesh spans exactly these devices.

    `devices_per_slice`: chips of a TPU slice or GPUs of a node (ICI); `num_slices`: slices or nodes (DCN).
    """
    mesh_config = resolve_mesh_config(mesh_preset, mesh)
    ici = [int(v) for v in dict(mesh_config.get("ici") or {}).values()]
    dcn = [int(v) for v in dict(mesh_config.get("dcn") or {}).values()]
    name = f"mesh_preset {mesh_preset!r}" if mesh_preset else "config.mesh"
    known_ici = math.prod(v for v in ici if v != -1)
    if (-1 not in ici and known_ici != devices_per_slice) or devices_per_slice % known_ici:
        raise ConfigError(f"{name} spans {known_ici} chips per slice but {where} has {devices_per_slice}: "
                          "pick the preset for this pod or set mesh.ici")
    known_dcn = math.prod(v for v in dcn if v != -1)
    if (-1 not in dcn and known_dcn != num_slices) or num_slices % known_dcn:
        raise ConfigError(f"{name} joins {known_dcn} slice(s) over DCN but {where} has {num_slices}: "
                          f"set mesh.dcn (e.g. --config.mesh.dcn.data={num_slices})")


def _sizes(level: Mapping[str, int] | None, name: str) -> list[int]:
    level = dict(level or {})
    unknown = sorted(set(level) - set(AXES))
    if unknown:
        raise ConfigError(f"mesh.{name} has unknown axis name(s) {unknown}; the axes are {list(AXES)}")
    sizes = [int(level.get(axis, 1)) for axis in AXES]
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh.{name} sizes must be positive or -1, got {dict(zip(AXES, sizes))}")
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh.{name} may have at most one -1, got {dict(zip(AXES, sizes))}")
    return sizes


def _fill(sizes: list[int], total: int, name: str) -> list[int]:
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % known:
            raise ConfigError(f"mesh.{name}: {total} devices cannot be split with fixed sizes "
                              f"{dict(zip(AXES, sizes))} (product {known} does not divide {total})")
        sizes = [total // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != total:
        raise ConfigError(f"mesh.{name} {dict(zip(AXES, sizes))} has {math.prod(sizes)} devices but "
                          f"{total} are available; use -1 on one axis to fill")
    return sizes


def mesh_shape(mesh_config: Mapping, num_devices: int, num_slices: int = 1) -> tuple[list[int], list[int]]:
    """(ICI sizes, DCN sizes) per axis, with -1 resolved; raises ConfigError with the fix."""
    dcn = _fill(_sizes(mesh_config.get("dcn"), "dcn"), num_slices, "dcn")
    if num_devices % num_slices:
        raise ConfigError(f"{num_devices} devices do not split into {num_slices} slices")
    ici = _fill(_sizes(mesh_config.get("ici"), "ici"), num_devices // num_slices, "ici")
    return ici, dcn


def build_mesh(mesh_config: Mapping, devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A `Mesh` with axes (data, fsdp, tensor); multi-slice meshes put DCN outermost on each axis.

    Granules joined over DCN are TPU slices (`device.slice_index`) or, on GPU, processes (nodes).
    """
    devices = list(devices if devices is not None else jax.devices())
    if mesh_config.get("num_devices"):  # use the first N devices (tests, or leaving devices idle)
        devices = devices[: int(mesh_config["num_devices"])]
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    process_is_granule = False
    wants_dcn = any(int(v) != 1 for v in dict(mesh_config.get("dcn") or {}).values())
    if num_slices == 1 and wants_dcn:
        num_slices = len({d.process_index for d in devices})
        process_is_granule = True
    ici, dcn = mesh_shape(mesh_config, len(devices), num_slices)
    if num_slices > 1:
        array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=process_is_granule)
    else:
        try:
            array = mesh_utils.create_device_mesh(ici, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # Topology-unaware fallback (e.g. fake CPU devices or a subset of a slice).
            array = np.asarray(devices).reshape(ici)
    return jax.sharding.Mesh(array, AXES)


def validate_for_model(mesh: jax.sharding.Mesh, config: Wav2Vec2Config, global_batch: int) -> None:
    """Check divisibility the sharding rules need, before any compile."""
    tensor = mesh.shape["tensor"]
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    problems = []
    for name, value in (("num_attention_heads", config.num_attention_heads),
                        ("intermediate_size", config.intermediate_size)):
        if value % tensor:
            problems.append(f"{name}={value} is not divisible by mesh tensor={tensor}")
    fsdp = mesh.shape["fsdp"]
    for name, value in (("hidden_size", config.hidden_size), ("conv_dim[-1]", config.conv_dim[-1])):
        if value % fsdp:
            problems.append(f"{name}={value} is not divisible by mesh fsdp={fsdp}")
    if global_batch % batch_shards:
        problems.append(f"global batch {global_batch} is not divisible by data*fsdp={batch_shards}")
    if problems:
        raise ConfigError("mesh does not fit the model: " + "; ".join(problems))
