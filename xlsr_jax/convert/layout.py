"""The one table between our parameter tree and Hugging Face PyTorch state-dict keys.

Our tree is taken in its stacked form (the `nn.scan` layout, `encoder/layers/...` with a leading
layer axis); `stack_layers` / `unstack_layers` move between that and the unrolled form.
Every parameter has a *kind* that says how its tensor is laid out on each side.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

Path = tuple[str, ...]

_INDEXED = re.compile(r"(conv_layers|layers)_(\d+)")
_LAYER_KEY = re.compile(r"^(.*encoder\.layers)\.(\d+)\.(.*)$")

# kind -> (ours -> HF, HF -> ours given our shape)
_KINDS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray, tuple], np.ndarray]]] = {
    "same": (lambda x: x, lambda t, s: t.reshape(s)),
    # Linear: ours [in, out], PyTorch [out, in].
    "dense": (lambda x: x.T, lambda t, s: t.T.reshape(s)),
    # q/k/v projections: ours [embed, heads, head_dim], PyTorch [heads*head_dim, embed].
    "dense_split_out": (lambda x: x.reshape(x.shape[0], -1).T, lambda t, s: t.T.reshape(s)),
    # attention output projection: ours [heads, head_dim, embed], PyTorch [embed, heads*head_dim].
    "dense_split_in": (lambda x: x.reshape(-1, x.shape[-1]).T, lambda t, s: t.T.reshape(s)),
    # Conv1d: ours [kernel, in/groups, out] (Flax), PyTorch [out, in/groups, kernel].
    "conv": (lambda x: x.transpose(2, 1, 0), lambda t, s: t.transpose(2, 1, 0).reshape(s)),
    # weight-norm magnitude: ours [kernel], PyTorch [1, 1, kernel] (norm over dim=2).
    "weight_g": (lambda x: x.reshape(1, 1, -1), lambda t, s: t.reshape(s)),
    # codebook: ours [G*V, d], PyTorch [1, G*V, d].
    "codevectors": (lambda x: x[None], lambda t, s: t.reshape(s)),
    "flatten": (lambda x: x.reshape(-1), lambda t, s: t.reshape(s)),
}

POS_CONV_G = "encoder.pos_conv_embed.conv.parametrizations.weight.original0"
POS_CONV_V = "encoder.pos_conv_embed.conv.parametrizations.weight.original1"
LEGACY_WEIGHT_NORM = {
    POS_CONV_G: "encoder.pos_conv_embed.conv.weight_g",
    POS_CONV_V: "encoder.pos_conv_embed.conv.weight_v",
}


def hf_key_and_kind(path: Path, hf_prefix: str = "wav2vec2.") -> tuple[str, str]:
    """Map one of our parameter paths (stacked layout) to its HF key (layer index as `{i}`) and kind.

    `hf_prefix` replaces our leading `wav2vec2` scope: "wav2vec2." for heads, "" for a bare
    `Wav2Vec2Model` checkpoint.
    """
    parts = [_INDEXED.sub(r"\1.\2", p) for p in path]
    *scopes, leaf = parts
    parent = scopes[-1] if scopes else ""
    kind = "same"
    if parent == "pos_conv_embed":
        scopes.append("conv")
        leaf, kind = {
            "weight_v": ("parametrizations.weight.original1", "conv"),
            "weight_g": ("parametrizations.weight.original0", "weight_g"),
            "bias": ("bias", "same"),
        }[leaf]
    elif re.fullmatch(r"conv_layers\.\d+", parent):
        scopes.append("conv")
        leaf, kind = {"kernel": ("weight", "conv"), "bias": ("bias", "same")}[leaf]
    elif leaf == "codevectors":
        kind = "codevectors"
    elif leaf == "kernel":
        leaf = "weight"
        kind = {"q_proj": "dense_split_out", "k_proj": "dense_split_out", "v_proj": "dense_split_out",
                "out_proj": "dense_split_in"}.get(parent, "dense")  # fmt: skip
    elif leaf == "scale":
        leaf = "weight"
    elif leaf == "bias" and parent in ("q_proj", "k_proj", "v_proj"):
        kind = "flatten"
    if scopes and scopes[0] == "wav2vec2":
        scopes = scopes[1:]
        key = hf_prefix + ".".join([*scopes, leaf])
    else:
        key = ".".join([*scopes, leaf])
    key = key.replace("encoder.layers.", "encoder.layers.{i}.")
    return key, kind


def to_hf(kind: str, value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(_KINDS[kind][0](np.asarray(value)))


def from_hf(kind: str, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(_KINDS[kind][1](np.asarray(tensor), tuple(shape)))


# ---- tree helpers ------------------------------------------------------------------------------


def flatten(tree: dict[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """(path, leaf) pairs of a nested dict, in sorted key order."""
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, dict):
            yield from flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def unflatten(items: dict[Path, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in items.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return tree


def _encoder(params: dict) -> dict:
    return params["wav2vec2"]["encoder"]


def stack_layers(params: dict) -> dict:
    """Unrolled `encoder/layers_{i}` subtrees -> one `encoder/layers` tree with a leading layer axis."""
    enc = _encoder(params)
    names = sorted((k for k in enc if _INDEXED.fullmatch(k)), key=lambda k: int(k.split("_")[-1]))
    if not names:
        return params
    import jax  # local: keep this module importable for numpy-only tooling

    stacked = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[enc[n] for n in names])
    new_enc = {k: v for k, v in enc.items() if k not in names}
    new_enc["layers"] = stacked
    return {**params, "wav2vec2": {**params["wav2vec2"], "encoder": new_enc}}


def unstack_layers(params: dict) -> dict:
    """The inverse of `stack_layers`."""
    enc = _encoder(params)
    if "layers" not in enc:
        return params
    import jax

    stacked = enc["layers"]
    num = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    new_enc = {k: v for k, v in enc.items() if k != "layers"}
    for i in range(num):
        new_enc[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return {**params, "wav2vec2": {**params["wav2vec2"], "encoder": new_enc}}
