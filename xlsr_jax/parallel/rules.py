"""Logical axis names -> mesh axes. Changing the parallelism means changing this table or the mesh.

Parameter axes: embed, mlp, heads, kv, layers, conv_kernel, conv_in, conv_out, vocab, classifier,
labels, codevectors, codevector, proj. Activation axes: batch, frames, samples, act_embed, act_mlp,
act_heads, act_conv.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

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
    ("conv_out", "fsdp"),
    ("vocab", None),  # character vocabularies (e.g. 43) rarely divide the tensor axis; lm_head is small
    ("classifier", None),
    ("labels", None),
    ("codevectors", None),
    ("codevector", None),
    ("proj", None),
)


def param_shardings(abstract_params, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for a boxed abstract parameter tree (from `jax.eval_shape` of the init)."""
    specs = nn.get_partition_spec(abstract_params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def logical_sharding(names: Sequence[str | None], mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """The NamedSharding of an activation/input with the given logical axis names."""
    spec = nn.logical_to_mesh_axes(tuple(names), rules)
    return jax.sharding.NamedSharding(mesh, spec)
