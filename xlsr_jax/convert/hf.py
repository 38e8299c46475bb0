"""Hugging Face transformers (PyTorch) checkpoints <-> xlsr-jax parameters and model directories.

Export writes `model.safetensors` with numpy (no torch needed) plus the feature-extractor and (CTC)
tokenizer files `transformers.pipeline` loads; import reads safetensors directly and falls back to
`torch.load(weights_only=True)` for legacy `pytorch_model.bin` files. Import also takes a Hub model id
(`org/name[@revision]`), resolved through the local Hugging Face cache.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import re
import shutil
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from data_pipelines.audio import SAMPLE_RATE
from data_pipelines.errors import UserError
from data_pipelines.vocab import BOS, EOS, PAD, UNK, WORD_DELIMITER, Vocabulary
from xlsr_jax.config import HF_ARCHITECTURES, Wav2Vec2Config
from xlsr_jax.convert import layout
from xlsr_jax.model_dir import MODEL_FILES, ModelDirError, load_model_dir, save_model_dir
from xlsr_jax.models.heads import abstract_params

log = logging.getLogger(__name__)

HEAD_FROM_ARCHITECTURE = {arch: head for head, arch in HF_ARCHITECTURES.items()}
# Tokenizer files travel with a model directory in both directions; vocab.json is ours too.
TOKENIZER_FILES = ("vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# What hf-to-jax fetches from the Hub: config, weights (safetensors, single or sharded), tokenizer and
# feature extractor; never the other files some repos carry (per-language adapters, ONNX, TF, Flax).
HUB_ALLOW_PATTERNS = ("config.json", "preprocessor_config.json", "processor_config.json", *TOKENIZER_FILES,
                      "model.safetensors", "model-*.safetensors", "model.safetensors.index.json")
LEGACY_WEIGHTS = "pytorch_model.bin"  # fetched only when a repo has no safetensors weights
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", LEGACY_WEIGHTS)  # one of these is read
# `org/name` or `org/name@revision`; a local path that exists always wins over this reading.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?")


class ConversionError(UserError):
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


def read_hf_dir(hf_dir: str | pathlib.Path, trust_pickle: bool = False) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json dict, state dict) of a Hugging Face model directory (`trust_pickle`: a legacy
    pytorch_model.bin may unpickle arbitrary objects, see `fairseq_pickle.load_torch_file`)."""
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
    feature_extractor = _read_feature_extractor(hf_dir)
    if feature_extractor is not None:
        hf_config["do_normalize"] = feature_extractor.get("do_normalize", True)
    return hf_config, _read_hf_weights(hf_dir, trust_pickle)


def _read_feature_extractor(hf_dir: pathlib.Path) -> dict[str, Any] | None:
    # transformers 4 saves `preprocessor_config.json`; transformers 5 nests the same settings in
    # `processor_config.json` when the feature extractor is saved as part of a processor.
    if (hf_dir / "preprocessor_config.json").is_file():
        return json.loads((hf_dir / "preprocessor_config.json").read_text())
    if (hf_dir / "processor_config.json").is_file():
        return json.loads((hf_dir / "processor_config.json").read_text()).get("feature_extractor")
    return None


def _read_hf_weights(hf_dir: pathlib.Path, trust_pickle: bool = False) -> dict[str, np.ndarray]:
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
    if (hf_dir / LEGACY_WEIGHTS).is_file():
        from xlsr_jax.convert.fairseq_pickle import load_torch_file  # imports this module: not at the top

        sd = load_torch_file(hf_dir / LEGACY_WEIGHTS, trust_pickle)
        if not isinstance(sd, dict):
            raise ConversionError(f"{hf_dir / LEGACY_WEIGHTS} holds a {type(sd).__name__}, not a state dict")
        return {k: v.float().numpy() for k, v in sd.items()}
    raise ModelDirError(f"{hf_dir}: no {', '.join(WEIGHT_FILES[:-1])} or {WEIGHT_FILES[-1]}")


def _is_complete_hf_dir(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


def resolve_hf_input(name: str | pathlib.Path) -> pathlib.Path:
    """A local path as is, or a Hub model id `org/name[@revision]` as its snapshot in the HF cache.

    The cache (HF_HUB_CACHE / HF_HOME) is tried first. On a miss, and only when Hub access is allowed
    (HF_HUB_OFFLINE unset), the files conversion needs (HUB_ALLOW_PATTERNS) are downloaded. A miss
    while offline, or a failed download, raises ConversionError with the command that fetches the model.
    """
    path = pathlib.Path(name)
    match = _HUB_ID.fullmatch(str(name))
    if path.exists() or match is None:
        return path
    from huggingface_hub import is_offline_mode, snapshot_download

    repo_id, revision = match["repo"], match["revision"]
    try:
        snapshot = pathlib.Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError, HFValidationError
        log.debug("%s: cache lookup failed: %s", name, e)  # its advice is about arguments we pass
        reason = "it is not in the local cache"
    else:
        if _is_complete_hf_dir(snapshot):
            log.info("%s: using the cached snapshot %s", name, snapshot)
            return snapshot
        reason = f"its cached snapshot {snapshot} lacks config.json or weights"
    if is_offline_mode():
        raise _hub_miss(name, repo_id, revision, f"{reason}; HF_HUB_OFFLINE is set, so nothing was fetched")
    log.info("%s: downloading %s from the Hugging Face Hub", name, ", ".join(HUB_ALLOW_PATTERNS))
    download = functools.partial(snapshot_download, repo_id, revision=revision)
    try:
        snapshot = pathlib.Path(download(allow_patterns=list(HUB_ALLOW_PATTERNS)))
        if not _is_complete_hf_dir(snapshot):
            snapshot = pathlib.Path(download(allow_patterns=[LEGACY_WEIGHTS]))
    except (OSError, ValueError) as e:  # connection errors, RepositoryNotFoundError, RevisionNotFoundError
        detail = " ".join(str(e).split())  # the Hub's messages span lines; the CLI prints one
        raise _hub_miss(name, repo_id, revision, f"{reason}, and the download failed ({type(e).__name__}: "
                                                 f"{detail})") from e
    if not _is_complete_hf_dir(snapshot):
        raise ConversionError(f"Hub model {repo_id!r} has no config.json or no weights "
                              f"({', '.join(WEIGHT_FILES)})")
    return snapshot


def _hub_miss(name: str | pathlib.Path, repo_id: str, revision: str | None, reason: str) -> ConversionError:
    from huggingface_hub import constants

    at = f" --revision {revision}" if revision else ""
    py_at = f", revision={revision!r}" if revision else ""
    return ConversionError(
        f"{str(name)!r} is not a local directory, and Hugging Face Hub model {repo_id!r} cannot be used: "
        f"{reason}. Cache searched: {constants.HF_HUB_CACHE} (HF_HUB_CACHE, or HF_HOME/hub). Fetch the model "
        f"with network access and HF_HUB_OFFLINE=0: `hf download {repo_id}{at}` (`huggingface-cli download` "
        f"before huggingface_hub 1.0) or `python -c \"from huggingface_hub import snapshot_download; "
        f"snapshot_download('{repo_id}'{py_at})\"`, then run the conversion again."
    )


def hf_to_jax(hf_input: str | pathlib.Path, output: str | pathlib.Path, head: str | None = None,
              trust_pickle: bool = False, **config_overrides: Any) -> pathlib.Path:
    """Convert a Hugging Face wav2vec2 directory or Hub id (`resolve_hf_input`) into an xlsr-jax model dir."""
    hf_dir = resolve_hf_input(hf_input)
    hf_config, sd = read_hf_dir(hf_dir, trust_pickle)
    declared = HEAD_FROM_ARCHITECTURE.get((hf_config.get("architectures") or ["Wav2Vec2Model"])[0])
    if head is None:
        if declared is None:
            raise ConversionError(f"unsupported architecture {hf_config['architectures'][0]!r}; supported: "
                                  f"{sorted(HEAD_FROM_ARCHITECTURE)}")
        head = declared
    config = Wav2Vec2Config.from_dict({**hf_config, **config_overrides})
    params = state_dict_to_params(sd, config, head, strict=head == declared)
    extra_files = [hf_dir / name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
    return save_model_dir(output, config, params, head, extra_files=extra_files)


def feature_extractor_config(config: Wav2Vec2Config) -> dict[str, Any]:
    """`preprocessor_config.json` for `Wav2Vec2FeatureExtractor`, preparing audio as our inference does."""
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": SAMPLE_RATE,
        "padding_value": 0.0,
        "padding_side": "right",
        # HF's zero_mean_unit_var_norm computes (x - mean) / sqrt(var + 1e-7) over the unpadded samples;
        # data_pipelines.audio.normalize, which our training and inference use, does the same with the
        # same 1e-7, so both sides feed the model identical input values (tests/test_hf_pipeline.py
        # checks the logits agree within 1e-4).
        "do_normalize": config.do_normalize,
        # Group-norm (base) models were trained without padding masks; HF asks not to pass them.
        "return_attention_mask": config.feat_extract_norm == "layer",
    }


def tokenizer_config() -> dict[str, Any]:
    """`tokenizer_config.json` for `Wav2Vec2CTCTokenizer` over a data_pipelines.vocab `vocab.json`."""
    return {
        "tokenizer_class": "Wav2Vec2CTCTokenizer",
        "processor_class": "Wav2Vec2Processor",
        "pad_token": PAD,  # the CTC blank
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "word_delimiter_token": WORD_DELIMITER,
        "replace_word_delimiter_char": " ",
        "do_lower_case": False,
        # Vocabulary.decode joins characters verbatim; HF's clean-up would also delete spaces before
        # punctuation, and the two decodings would differ.
        "clean_up_tokenization_spaces": False,
    }


def jax_to_hf(model_dir: str | pathlib.Path, output: str | pathlib.Path,
              legacy_weight_norm: bool = False) -> pathlib.Path:
    """Export an xlsr-jax model directory as a Hugging Face directory for `from_pretrained` and `pipeline`.

    Writes weights, config.json (with `id2label`/`label2id`), `preprocessor_config.json` and, for a CTC
    model directory with our `vocab.json`, `tokenizer_config.json` + `special_tokens_map.json`.
    Tokenizer files the model directory already has (it came from Hugging Face) are copied as they are.
    """
    from safetensors.numpy import save_file

    config, head, params = load_model_dir(model_dir)
    model_dir, output = pathlib.Path(model_dir), pathlib.Path(output)
    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    write_tokenizer = head == "ctc" and "vocab.json" in present and "tokenizer_config.json" not in present
    if write_tokenizer:  # check before writing anything
        _check_vocab(model_dir / "vocab.json", config)
    output.mkdir(parents=True, exist_ok=True)
    sd = params_to_state_dict(params, config, head, legacy_weight_norm)
    save_file(sd, str(output / "model.safetensors"), metadata={"format": "pt"})
    hf_config = config.to_hf_dict()
    hf_config["architectures"] = [HF_ARCHITECTURES[head]]
    (output / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    preprocessor = json.dumps(feature_extractor_config(config), indent=2)
    (output / "preprocessor_config.json").write_text(preprocessor + "\n")
    for name in present:
        shutil.copy(model_dir / name, output / name)
    if write_tokenizer:
        (output / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
        (output / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    elif head == "ctc" and "vocab.json" not in present:
        log.warning("%s has no vocab.json, so the exported CTC model %s has no tokenizer: "
                    "transformers.pipeline('automatic-speech-recognition') and Wav2Vec2Processor need one. "
                    "Put the training run's vocab.json into the model directory and export again.",
                    model_dir, output)
    return output


def _check_vocab(path: pathlib.Path, config: Wav2Vec2Config) -> None:
    try:
        vocab = Vocabulary.load(path)
    except ValueError as e:  # also bad JSON and bad UTF-8
        raise ConversionError(f"{path}: not a vocabulary a CTC tokenizer can be written for: {e}") from e
    if len(vocab) > config.vocab_size:
        raise ConversionError(f"{path} has {len(vocab)} tokens but the CTC head has vocab_size="
                              f"{config.vocab_size} outputs: this vocabulary does not belong to this model")
    if config.pad_token_id != vocab.pad_id:
        log.warning("%s: the CTC blank %s has id %d but config.pad_token_id=%d; Hugging Face's CTC loss "
                    "would use the wrong blank", path, PAD, vocab.pad_id, config.pad_token_id)


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
    "HUB_ALLOW_PATTERNS",
    "TOKENIZER_FILES",
    "feature_extractor_config",
    "hf_to_jax",
    "jax_to_hf",
    "params_to_state_dict",
    "read_hf_dir",
    "resolve_hf_input",
    "state_dict_to_params",
    "tokenizer_config",
]  # fmt: skip
