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
    """A `Mesh` with axes (data, fsdp, tensor); multi-slice meshes put DCN outermost on each axis."""
    devices = list(devices if devices is not None else jax.devices())
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    ici, dcn = mesh_shape(mesh_config, len(devices), num_slices)
    if num_slices > 1:
        array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
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
                        ("intermediate_size", config.intermediate_size), ("vocab_size", config.vocab_size)):
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
