"""Per-host numpy batches -> global `jax.Array`s sharded along the mesh's batch axes.

Each host passes its own rows (from `pipeline.make_dataset(..., shard_index=jax.process_index())`);
`jax.make_array_from_process_local_data` stitches them into one global array whose leading axis
is split over the mesh axes the logical name "batch" maps to (`data`, `fsdp` by default) and
replicated over the rest (`tensor`). The logical axes of each key come from the task
(`Task.batch_axes`); a key without any shards its leading axis only.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np

from xlsr_jax.parallel.rules import DEFAULT_RULES, Rules, logical_sharding

LogicalAxes = Mapping[str, tuple[str | None, ...]]


def batch_shardings(
    batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES,
    axes: LogicalAxes | None = None,
) -> dict[str, jax.sharding.NamedSharding]:
    """The NamedSharding of every array in `batch` (logical axes by key from `axes`)."""
    out = {}
    for key, value in batch.items():
        names = (axes or {}).get(key, ("batch",) + (None,) * (np.ndim(value) - 1))
        if len(names) != np.ndim(value):
            raise ValueError(
                f"batch[{key!r}] has {np.ndim(value)} dims, its logical axes {names} have {len(names)}"
            )
        out[key] = logical_sharding(names, mesh, rules)
    return out


def to_global_batch(
    batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES,
    axes: LogicalAxes | None = None,
) -> dict[str, jax.Array]:
    """Global arrays of shape [process_count * local_batch, ...] built from this host's rows."""
    shardings = batch_shardings(batch, mesh, rules, axes)
    out = {}
    for key, value in batch.items():
        sharding = shardings[key]
        spec = sharding.spec[0] if len(sharding.spec) else None
        axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
        ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        per_process = max(1, ways // jax.process_count())
        if np.shape(value)[0] % per_process:
            raise ValueError(
                f"batch[{key!r}] has {np.shape(value)[0]} rows on this host, not divisible by the "
                f"{per_process} batch shards ({'x'.join(axes)}) each host holds"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return out


def to_host_local(outputs: Mapping[str, jax.Array], mesh: jax.sharding.Mesh,
                  rules: Rules = DEFAULT_RULES) -> dict[str, np.ndarray]:
    """This host's rows of batch-sharded outputs, in the order it fed them (the inverse of `to_global_batch`).

    Outputs must be sharded like the batch on their leading axis (e.g. jitted with
    `out_shardings=logical_sharding(("batch", ...))`): each host then reads only its own shards.
    """
    if jax.process_count() == 1:
        return {k: np.asarray(jax.device_get(v)) for k, v in outputs.items()}
    from jax.experimental import multihost_utils

    return {k: np.asarray(multihost_utils.global_array_to_host_local_array(v, mesh, v.sharding.spec))
            for k, v in outputs.items()}
