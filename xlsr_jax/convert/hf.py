"""Hugging Face transformers (PyTorch) checkpoints <-> xlsr-jax parameters and model directories.

Export writes `model.safetensors` with numpy (no torch needed); import reads safetensors directly and
falls back to `torch.load(weights_only=True)` for legacy `pytorch_model.bin` files.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from xlsr_jax.config import HF_ARCHITECTURES, Wav2Vec2Config
from xlsr_jax.convert import layout
from xlsr_jax.model_dir import MODEL_FILES, ModelDirError, load_model_dir, save_model_dir
from xlsr_jax.models.heads import abstract_params

log = logging.getLogger(__name__)

HEAD_FROM_ARCHITECTURE = {arch: head for head, arch in HF_ARCHITECTURES.items()}


class ConversionError(ValueError):
    """A checkpoint that does not fit the model its config describes."""


def _hf_prefix(head: str) -> str:
    return "" if head == "base" else "wav2vec2."


def state_dict_to_params(
    state_dict: Mapping[str, Any], config: Wav2Vec2Config, head: str, strict: bool = True
) -> dict:
    """HF state dict (name -> array) -> our unboxed float32 params, in the layout `config.scan_layers` asks.

    Raises ConversionError listing every missing key and shape mismatch, and (when `strict`) every
    key the model does not use. Both weight-norm spellings are accepted.
    """
    sd = {k: v for k, v in state_dict.items()}
    for new, old in layout.LEGACY_WEIGHT_NORM.items():
        for prefix in ("", "wav2vec2."):
            if prefix + old in sd and prefix + new not in sd:
                sd[prefix + new] = sd.pop(prefix + old)
    prefix = _hf_prefix(head)
    if head == "base" and not any(k.startswith("feature_extractor.") for k in sd):
        prefix = "wav2vec2."  # a head checkpoint read as a bare encoder: take its `wav2vec2.` part
    target = nn.meta.unbox(abstract_params(config.replace(scan_layers=True), head))
    used, missing, mismatched, out = set(), [], [], {}
    for path, leaf in layout.flatten(target):
        shape = leaf.shape
        key, kind = layout.hf_key_and_kind(path, prefix)
        keys = [key.format(i=i) for i in range(shape[0])] if "{i}" in key else [key]
        tensors = []
        for k in keys:
            if k not in sd:
                missing.append(k)
                continue
            used.add(k)
            tensors.append(np.asarray(_to_numpy(sd[k]), dtype=np.float32))
        if len(tensors) != len(keys):
            continue
        per_layer_shape = shape[1:] if len(keys) > 1 or "{i}" in key else shape
        try:
            values = [layout.from_hf(kind, t, per_layer_shape) for t in tensors]
        except ValueError:
            mismatched.append(f"{keys[0]}: checkpoint {tuple(tensors[0].shape)} vs model {per_layer_shape}")
            continue
        out[path] = np.stack(values) if "{i}" in key else values[0]
    unexpected = sorted(set(sd) - used)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_preview(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
    if problems:
        raise ConversionError(f"checkpoint does not match a {head!r} model with this config: " + "; ".join(problems))
    if unexpected:
        log.warning("ignoring %d checkpoint key(s) the %r model does not use: %s", len(unexpected), head,
                    _preview(unexpected))
    params = layout.unflatten(out)
    return params if config.scan_layers else layout.unstack_layers(params)


def params_to_state_dict(
    params: dict, config: Wav2Vec2Config, head: str, legacy_weight_norm: bool = False
) -> dict[str, np.ndarray]:
    """Our params (either layer layout) -> HF state dict of float32 numpy arrays."""
    params = layout.stack_layers(jax.tree_util.tree_map(np.asarray, params))
    prefix = _hf_prefix(head)
    sd = {}
    for path, value in layout.flatten(params):
        key, kind = layout.hf_key_and_kind(path, prefix)
        if "{i}" in key:
            for i in range(value.shape[0]):
                sd[key.format(i=i)] = layout.to_hf(kind, value[i])
        else:
            sd[key] = layout.to_hf(kind, value)
    if legacy_weight_norm:
        for new, old in layout.LEGACY_WEIGHT_NORM.items():
            sd[prefix + old] = sd.pop(prefix + new)
    return {k: v.astype(np.float32) for k, v in sd.items()}


# ---- directories -------------------------------------------------------------------------------


def read_hf_dir(hf_dir: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, state dict) of a Hugging Face model directory."""
    hf_dir = pathlib.Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"{hf_dir} is not a Hugging Face model directory: no config.json")
    hf_config = json.loads(config_path.read_text())
    if hf_config.get("model_type") not in (None, "wav2vec2"):
        raise ConversionError(f"{config_path}: model_type {hf_config.get('model_type')!r} is not 'wav2vec2'")
    # transformers 5 writes the *storage* dtype as "dtype" (older: "torch_dtype"); ours is the compute
    # dtype, so an fp16 checkpoint must not turn into fp16 compute.
    hf_config.pop("dtype", None)
    hf_config.pop("torch_dtype", None)
    preprocessor = hf_dir / "preprocessor_config.json"
    if preprocessor.is_file():
        hf_config["do_normalize"] = json.loads(preprocessor.read_text()).get("do_normalize", True)
    return hf_config, _read_hf_weights(hf_dir)


def _read_hf_weights(hf_dir: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if (hf_dir / "model.safetensors").is_file():
        return load_file(hf_dir / "model.safetensors")
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(load_file(hf_dir / shard))
        return sd
    if (hf_dir / "pytorch_model.bin").is_file():
        import torch

        sd = torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}
    raise ModelDirError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def hf_to_jax(hf_dir: str | pathlib.Path, output: str | pathlib.Path, head: str | None = None,
              **config_overrides: Any) -> pathlib.Path:
    """Convert a Hugging Face wav2vec2 directory into an xlsr-jax model directory."""
    hf_config, sd = read_hf_dir(hf_dir)
    if head is None:
        arch = (hf_config.get("architectures") or ["Wav2Vec2Model"])[0]
        if arch not in HEAD_FROM_ARCHITECTURE:
            raise ConversionError(f"unsupported architecture {arch!r}; supported: {sorted(HEAD_FROM_ARCHITECTURE)}")
        head = HEAD_FROM_ARCHITECTURE[arch]
    config = Wav2Vec2Config.from_dict({**hf_config, **config_overrides})
    params = state_dict_to_params(sd, config, head, strict=head == HEAD_FROM_ARCHITECTURE.get(
        (hf_config.get("architectures") or ["Wav2Vec2Model"])[0]))
    extra_files = [pathlib.Path(hf_dir) / f for f in ("vocab.json", "tokenizer_config.json",
                                                        "special_tokens_map.json") if (pathlib.Path(hf_dir) / f).is_file()]
    return save_model_dir(output, config, params, head, extra_files=extra_files)


def jax_to_hf(model_dir: str | pathlib.Path, output: str | pathlib.Path, legacy_weight_norm: bool = False) -> pathlib.Path:
    """Export an xlsr-jax model directory as a Hugging Face directory that `from_pretrained` loads."""
    from safetensors.numpy import save_file

    config, head, params = load_model_dir(model_dir)
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    sd = params_to_state_dict(params, config, head, legacy_weight_norm)
    save_file(sd, str(output / "model.safetensors"), metadata={"format": "pt"})
    hf_config = config.to_hf_dict()
    hf_config["architectures"] = [HF_ARCHITECTURES[head]]
    (output / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    preprocessor = {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": 16000,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": config.do_normalize,
        # Group-norm (base) models were trained without padding masks; HF asks not to pass them.
        "return_attention_mask": config.feat_extract_norm == "layer",
    }
    (output / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    for name in ("vocab.json", "tokenizer_config.json", "special_tokens_map.json"):
        src = pathlib.Path(model_dir) / name
        if src.is_file():
            shutil.copy(src, output / name)
    return output



def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def _preview(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


__all__ = [
    "MODEL_FILES",
    "ConversionError",
    "hf_to_jax",
    "jax_to_hf",
    "params_to_state_dict",
    "read_hf_dir",
    "state_dict_to_params",
]  # fmt: skip
