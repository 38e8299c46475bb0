"""TPU topologies on a machine without TPUs: pod names -> chip grids -> abstract devices for AOT compiles.

Pod names count what Cloud TPU bills: TensorCores for v4 and v5p (two per chip, one JAX device
per chip in megacore mode), chips for v5e and v6e. `v4-128` is therefore 64 chips (`v4:4x4x4`) and
`v5e-256` 256 chips (`v5e:16x16`). Chip-grid names (`v5e:16x16`, `v5p:4x4x4`) are accepted as they are.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from xlsr_jax.config import ConfigError

# Per generation: (name in chip grids, TensorCores per chip in pod names, HBM bytes per chip).
# HBM is the vendor figure; XLA's own limit is a little lower (v5e compiles report 15.75 GiB).
GENERATIONS = {
    "v4": ("v4", 2, 32 * 2**30),
    "v5e": ("v5e", 1, 16 * 2**30),
    "v5p": ("v5p", 2, 95 * 2**30),
    "v6e": ("v6e", 1, 32 * 2**30),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

# Chips -> grid for the shapes Cloud TPU sells (3-D tori for v4/v5p, 2-D for v5e/v6e).
_GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_GRIDS_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

TPU_EXTRA_HINT = 'the TPU compiler is not installed: pip install "xlsr-jax[tpu]" (or pip install "jax[tpu]==0.10.2")'


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user typed it
    generation: str  # v4, v5e, v5p, v6e
    grid: str  # e.g. "16x16"
    num_slices: int

    @property
    def chip_grid_name(self) -> str:
        return f"{GENERATIONS[self.generation][0]}:{self.grid}"

    @property
    def chips_per_slice(self) -> int:
        return math.prod(int(d) for d in self.grid.split("x"))

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def hbm_bytes(self) -> int:
        return GENERATIONS[self.generation][2]

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return f"{self.name} ({self.chip_grid_name}{slices}, {self.num_chips} chips, " \
               f"{self.hbm_bytes / 2**30:.0f} GiB HBM per chip)"


def accepted_names() -> list[str]:
    """Examples of every accepted spelling, for error messages."""
    pods = [f"{g}-{n * GENERATIONS[g][1]}" for g in ("v4", "v5p") for n in (4, 64, 512)]
    pods += [f"{g}-{n}" for g in ("v5e", "v6e") for n in (8, 256)]
    return pods + ["v5e:16x16", "v5p:4x4x4", "v4:4x4x4", "v6e:16x16"]


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """A pod name (`v5e-256`, `v4-128`, `v5litepod-16`) or chip grid (`v5p:4x4x4`) -> Topology."""
    if num_slices < 1:
        raise ConfigError(f"--num-slices must be >= 1, got {num_slices}")
    text = name.strip().lower()
    grid_match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", text)
    pod_match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if grid_match:
        generation = _ALIASES.get(grid_match.group(1), grid_match.group(1))
        grid = grid_match.group(2)
    elif pod_match:
        generation = _ALIASES.get(pod_match.group(1), pod_match.group(1))
        count = int(pod_match.group(2))
        if generation in GENERATIONS:
            cores = GENERATIONS[generation][1]
            chips, rest = divmod(count, cores)
            grids = _GRIDS_3D if generation in ("v4", "v5p") else _GRIDS_2D
            if rest or chips not in grids:
                raise ConfigError(f"unknown TPU topology {name!r}: {generation} pods come as "
                                  f"{', '.join(f'{generation}-{c * cores}' for c in grids)}")
            grid = grids[chips]
        else:
            grid = ""
    else:
        generation, grid = "", ""
    if generation not in GENERATIONS or not grid:
        raise ConfigError(f"unknown TPU topology {name!r}; use a pod name or a chip grid, e.g. "
                          f"{', '.join(accepted_names())}")
    return Topology(name=name, generation=generation, grid=grid, num_slices=num_slices)


def quiet_libtpu(accelerator_type: str = "v5p-16") -> None:
    """Keep libtpu from probing cloud metadata and printing start-up errors on a machine with no TPU.

    Only fills variables that are unset, so a real TPU VM's own settings win.
    """
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # AOT compiles touch no chip: let several compiles (or a test beside a compile) load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: Topology) -> list:
    """Abstract TPU devices of `topology` (nothing needs to be attached); raises ConfigError with the fix."""
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(TPU_EXTRA_HINT)
    quiet_libtpu()
    from jax.experimental import topologies

    kwargs = {"num_slices": topology.num_slices} if topology.num_slices > 1 else {}
    if topology.generation == "v4":
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as v4 pods run
    try:
        desc = topologies.get_topology_desc(topology_name=topology.chip_grid_name, platform="tpu", **kwargs)
    except Exception as e:  # libtpu reports a bad grid as a generic runtime error
        raise ConfigError(f"TPU topology {topology.chip_grid_name} was refused by libtpu: {str(e).splitlines()[0]}; "
                          f"try one of {', '.join(accepted_names())}") from e
    return list(desc.devices)
