"""Experiment configs: `experiments/<file>.py[:preset]` + `--config.a.b=value` overrides.

An experiment file defines `get_config(preset: str | None) -> ml_collections.ConfigDict`.
Overrides are parsed as Python literals when they look like one (10, 1e-3, True, (8, 1, 1)) and
kept as strings otherwise; ConfigDict's own type checks reject a wrong type with a clear message.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import pathlib
from collections.abc import Sequence

import ml_collections

from xlsr_jax.config import ConfigError, Wav2Vec2Config


def load_experiment(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`path.py[:preset]` -> validated ConfigDict with `--config.x.y=v` overrides applied."""
    path_str, _, preset = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"xlsr_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    config = module.get_config(preset or None)
    for item in overrides:
        apply_override(config, item)
    return config


_MODEL_FIELDS = {f.name for f in dataclasses.fields(Wav2Vec2Config)}


def _parse(raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _did_you_mean(name: str, choices, parents: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f"did you mean {'.'.join([*parents, close[0]])!r}? " if close else ""


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Apply one `config.a.b=value` (or `a.b=value`) override in place."""
    key, sep, raw = item.removeprefix("--").removeprefix("config.").partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} is not of the form --config.a.b=value")
    *parents, leaf = key.split(".")
    node = config
    for depth, name in enumerate(parents):
        if name not in node:
            raise ConfigError(f"unknown config section {key!r}: {_did_you_mean(name, node.keys(), parents[:depth])}"
                              f"{name!r} is not in {sorted(node.keys())}")
        node = node[name]
    if leaf not in node and parents == ["model", "overrides"] and leaf in _MODEL_FIELDS:
        node[leaf] = _parse(raw)  # any Wav2Vec2Config field may be overridden, not only the preset's listed ones
        return
    if leaf not in node:
        choices = set(node.keys()) | (_MODEL_FIELDS if parents == ["model", "overrides"] else set())
        raise ConfigError(f"unknown config key {key!r}; {_did_you_mean(leaf, choices, parents)}"
                          f"{'.'.join(parents) or 'top level'} has {sorted(node.keys())}")
    value = _parse(raw)
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"override {key}={raw!r}: {e}") from e
