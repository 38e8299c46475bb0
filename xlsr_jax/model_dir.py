"""The xlsr-jax model directory: `config.json` + Orbax-saved params (+ vocab/labels files).

    MODEL_DIR/
      config.json    Wav2Vec2Config fields (Hugging Face names where they exist) + "head" + "architectures"
      params/        Orbax checkpoint of the float32 params, layers always stacked (nn.scan layout)
      vocab.json     CTC vocabulary in Wav2Vec2CTCTokenizer form (CTC heads, when known)

Params are stored stacked whatever `scan_layers` says, so a directory loads into either layout.
"""

from __future__ import annotations

import json
import pathlib
import shutil

from etils import epath
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from data_pipelines.errors import UserError
from xlsr_jax.config import HEADS, HF_ARCHITECTURES, Wav2Vec2Config
from xlsr_jax.convert import layout
from xlsr_jax.models.heads import abstract_params
from xlsr_jax.train.checkpoint import shape_differences

MODEL_FILES = ("config.json", "params")


class ModelDirError(UserError):
    """A model directory that is missing, incomplete, or not ours."""


def save_model_dir(
    path: str | pathlib.Path,
    config: Wav2Vec2Config,
    params: dict,
    head: str,
    extra_files: Iterable[pathlib.Path] = (),
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a model directory; refuses to overwrite an existing one unless asked."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if head not in HEADS:
        raise ModelDirError(f"unknown head {head!r}; choose one of {HEADS}")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ModelDirError(f"{path} exists and is not empty; choose a new output directory")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    stacked = layout.stack_layers(jax.tree_util.tree_map(np.asarray, nn.meta.unbox(params)))
    stacked = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), stacked)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", stacked)
        ckptr.wait_until_finished()
    for src in extra_files:  # local or in a bucket (e.g. a run's gs://.../vocab.json)
        (path / epath.Path(src).name).write_bytes(epath.Path(src).read_bytes())
    # config.json last: its presence marks a complete directory.
    config.save(path / "config.json", head=head, architectures=[HF_ARCHITECTURES[head]])
    return path


def read_config(path: str | pathlib.Path) -> tuple[Wav2Vec2Config, str]:
    """(config, head) of a model directory."""
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise ModelDirError(f"{path} is not an xlsr-jax model directory: no config.json")
    try:
        data = json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{path}/config.json is corrupt ({e})") from e
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}/config.json is not a JSON object")
    head = data.get("head")
    if head not in HEADS:
        raise ModelDirError(
            f"{path}/config.json has no valid 'head' ({head!r}); is this a Hugging Face directory? "
            "Convert it first: xlsr-jax convert hf-to-jax --input DIR --output MODEL_DIR"
        )
    try:
        return Wav2Vec2Config.from_dict(data), head
    except (TypeError, ValueError) as e:  # a field of the wrong type or out of range
        raise ModelDirError(f"{path}/config.json does not describe a valid model: {e}") from e


def _check_saved_shapes(path: pathlib.Path, saved: Any, expected: Any) -> None:
    """Compare the saved arrays with the model config.json describes before reading any of them."""
    problems = shape_differences(saved, expected)
    if problems:
        raise ModelDirError(f"{path}/params does not match the model in config.json ({len(problems)} arrays): "
                            + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else ""))


def load_model_dir(
    path: str | pathlib.Path, shardings: Any = None, **config_overrides: Any
) -> tuple[Wav2Vec2Config, str, dict]:
    """(config, head, params) from a model directory.

    `shardings` (a tree matching the stacked params, or None for the default device) places each
    array as it is read, so a large model never needs a full copy on one device. `config_overrides`
    change numerics-only fields (dtype, scan_layers, remat_policy).
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    config, head = read_config(path)
    if config_overrides:
        config = config.replace(**config_overrides)
    if not (path / "params").is_dir():
        raise ModelDirError(f"{path} has no params/ checkpoint")
    abstract = nn.meta.unbox(abstract_params(config.replace(scan_layers=True), head))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, abstract)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    with ocp.StandardCheckpointer() as ckptr:
        _check_saved_shapes(path, ckptr.metadata(path / "params").item_metadata.tree, abstract)
        try:
            params = ckptr.restore(path / "params", target)
        except (ValueError, KeyError) as e:
            raise ModelDirError(f"{path}/params does not match the model in config.json: {e}") from e
    if not config.scan_layers:
        params = layout.unstack_layers(params)
    return config, head, params
