"""Logical axis names -> mesh axes. Changing the parallelism means changing this table or the mesh.

Parameter axes: embed, mlp, heads, kv, layers, conv_kernel, conv_in, conv_out, vocab, classifier,
labels, codevectors, codevector, proj. Activation axes: batch, frames, samples, act_embed, act_mlp,
act_heads, act_conv.

`DEFAULT_RULES` is the default of every experiment's `config.sharding.rules` section (one entry per
logical name, overridable from the command line: `--config.sharding.rules.conv_out=fsdp`,
`--config.sharding.rules.batch=data,fsdp`, `--config.sharding.rules.embed=None`).
`sharding_context` makes the table and the mesh visible to the model's activation constraints
while a step is traced; without it, flax's `nn.with_logical_constraint` is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import flax.linen as nn
import jax

from xlsr_jax.config import ConfigError
from xlsr_jax.parallel.mesh import AXES

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# data: pure data parallel; fsdp: data parallel with parameters and optimizer state sharded
# (ZeRO-3 style); tensor: Megatron-style split of heads and FFN width.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("samples", None),
    ("frames", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_conv", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("conv_kernel", None),
    ("conv_in", None),
    # Conv kernels are stored sharded but gathered whole before use (layers.gathered): a few percent
    # of the parameters, and XLA otherwise rotates the shards around the ring one kernel tap at a time.
    ("conv_out", "fsdp"),
    ("vocab", None),  # character vocabularies (e.g. 43) rarely divide the tensor axis; lm_head is small
    ("classifier", None),
    ("labels", None),
    ("codevectors", None),
    ("codevector", None),
    ("proj", None),
)


def rules_to_config(rules: Rules = DEFAULT_RULES) -> dict[str, str]:
    """The rules as `config.sharding.rules` holds them: logical name -> "axis", "a,b" or "" (replicated)."""
    def text(value):
        if value is None:
            return ""
        return value if isinstance(value, str) else ",".join(value)

    return {name: text(value) for name, value in rules}


def rules_from_config(section: Mapping[str, object]) -> Rules:
    """`config.sharding.rules` -> a rules table, in DEFAULT_RULES' order; raises ConfigError on bad entries."""
    known = [name for name, _ in DEFAULT_RULES]
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ConfigError(f"sharding.rules has unknown logical axis name(s) {unknown}; the names are {known}")
    rules = []
    for name, default in DEFAULT_RULES:
        value = section.get(name, default)
        if isinstance(value, str):
            parts = tuple(p.strip() for p in value.replace("+", ",").split(",") if p.strip())
            value = None if not parts or parts == ("None",) or parts == ("none",) else parts
        elif value is not None:
            value = tuple(value)
        bad = [axis for axis in (value or ()) if axis not in AXES]
        if bad:
            raise ConfigError(f"sharding.rules.{name}={section.get(name)!r} names mesh axis(es) {bad}; "
                              f"the mesh axes are {list(AXES)} (comma-separate several, empty for replicated)")
        if value is not None and len(value) == 1:
            value = value[0]
        rules.append((name, value))
    return tuple(rules)


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
    """Make `nn.with_logical_constraint` real: the rules table plus the (abstract) mesh, usable inside jit."""
    with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def param_shardings(abstract_params, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for a boxed abstract parameter tree (from `jax.eval_shape` of the init)."""
    specs = nn.get_partition_spec(abstract_params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def logical_sharding(names: Sequence[str | None], mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """The NamedSharding of an activation/input with the given logical axis names."""
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    return jax.sharding.NamedSharding(mesh, spec)
