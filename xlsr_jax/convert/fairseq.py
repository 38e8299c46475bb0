"""fairseq wav2vec 2.0 / XLS-R checkpoints (pretraining and CTC fine-tuned) -> xlsr-jax model directories.

fairseq is not imported: `fairseq_pickle.load_fairseq_checkpoint` reads the file safely. Here its config
is mapped onto `Wav2Vec2Config`, its state dict is renamed into the Hugging Face layout and handed to
`convert.hf.state_dict_to_params` (so both importers share one parameter table), and a CTC model's
target dictionary becomes `vocab.json`.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import pathlib
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from xlsr_jax.config import Wav2Vec2Config
from xlsr_jax.convert.fairseq_pickle import DictionaryStub, load_fairseq_checkpoint
from xlsr_jax.convert.hf import ConversionError, state_dict_to_params
from xlsr_jax.model_dir import save_model_dir

log = logging.getLogger(__name__)

FAIRSEQ_HEADS = ("pretraining", "ctc")

# ---- configuration --------------------------------------------------------------------------------

# fairseq.models.wav2vec.wav2vec2.Wav2Vec2Config defaults (fairseq 0.12), used when a field is absent.
_FAIRSEQ_DEFAULTS: dict[str, Any] = {
    "extractor_mode": "default", "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu", "layer_type": "transformer",
    "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0.0,
    "dropout_input": 0.0, "dropout_features": 0.0, "final_dim": 0, "layer_norm_first": False,
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "conv_bias": False, "logit_temp": 0.1, "quantize_input": False, "feature_grad_mult": 1.0,
    "quantizer_depth": 1, "latent_vars": 320, "latent_groups": 2, "latent_dim": 0,
    "mask_length": 10, "mask_prob": 0.65, "mask_channel_length": 10, "mask_channel_prob": 0.0,
    "num_negatives": 100, "conv_pos": 128, "conv_pos_groups": 16, "pos_conv_depth": 1,
    "normalize": False,  # a task field (audio_pretraining / audio_finetuning), default False
}  # fmt: skip

# Fields of fairseq's Wav2Vec2AsrConfig that Wav2VecEncoder writes over the pretrained model's config.
_CTC_ARG_OVERRIDES = {
    **{k: k for k in ("dropout", "activation_dropout", "attention_dropout", "dropout_input", "mask_length",
                      "mask_prob", "mask_channel_length", "mask_channel_prob", "feature_grad_mult")},
    "layerdrop": "encoder_layerdrop",
}  # fmt: skip
_CTC_ONLY_FIELDS = {"final_dropout": 0.0, "apply_mask": False}  # with fairseq's defaults

_ACTIVATIONS = {"gelu": "gelu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new", "relu": "relu",
                "swish": "swish"}  # fmt: skip
_INTERPOLATION = re.compile(r"\$\{([\w.]+)\}")


def fairseq_model_config(ckpt: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(fields of the wav2vec 2.0 model inside the checkpoint, head "pretraining" or "ctc").

    Reads `cfg["model"]` (trainer checkpoints) or the legacy `args` Namespace. For CTC checkpoints
    the encoder's fields come from `w2v_args`, with the fine-tuning values fairseq writes over them
    (dropouts, masking, layerdrop, feature_grad_mult) plus `final_dropout` and `apply_mask`. Also
    included: the task's `normalize` and the criterion's `loss_weights` (pretraining) or
    `zero_infinity` (CTC).
    """
    root = _plain(ckpt.get("cfg"))
    if isinstance(root, dict) and isinstance(root.get("model"), dict):
        model, task = root["model"], root.get("task") or {}
    elif ckpt.get("args") is not None:
        root = _plain(ckpt["args"])
        model = task = root  # legacy: one flat Namespace for model, task and trainer
    else:
        raise ConversionError("checkpoint has neither cfg['model'] nor args: cannot find the model config")
    model = _resolve(model, [root])
    task = _resolve(task, [root])
    criterion = root.get("criterion") if isinstance(root.get("criterion"), dict) else root
    name = model.get("_name") or model.get("arch")
    is_ctc = "w2v_args" in model or name in ("wav2vec_ctc", "wav2vec2_ctc")
    if not is_ctc:
        _check_wav2vec2_name(name, "model")
        fields = {k: v for k, v in model.items() if k != "_name"}
        fields.setdefault("normalize", task.get("normalize"))
        fields.setdefault("loss_weights", criterion.get("loss_weights"))  # wav2vec criterion
        return _drop_none(fields), "pretraining"
    if name not in (None, "wav2vec_ctc", "wav2vec2_ctc"):
        raise ConversionError(f"unsupported fine-tuned model {name!r}: only CTC (wav2vec_ctc) checkpoints convert")
    w2v = _plain(model.get("w2v_args"))
    if not isinstance(w2v, dict) or not w2v:
        raise ConversionError(
            "CTC checkpoint has no w2v_args (the pretrained encoder's config); it was saved without it "
            f"(w2v_path={model.get('w2v_path')!r}), so the encoder's shape is unknown"
        )
    if isinstance(w2v.get("model"), dict):
        enc, enc_task = w2v["model"], w2v.get("task") or {}
    else:
        enc = enc_task = w2v  # legacy: w2v_args is the pretraining run's flat Namespace
    enc = _resolve(enc, [w2v, root])
    enc_task = _resolve(enc_task, [w2v, root])
    _check_wav2vec2_name(enc.get("_name") or enc.get("arch"), "w2v_args model")
    fields = {k: v for k, v in enc.items() if k != "_name"}
    for src, dst in _CTC_ARG_OVERRIDES.items():
        if model.get(src) is not None:
            fields[dst] = model[src]
    for key, default in _CTC_ONLY_FIELDS.items():
        fields[key] = model.get(key, default)
    normalize = next((v for v in (model.get("normalize"), task.get("normalize"), enc_task.get("normalize"))
                      if isinstance(v, bool)), None)  # fmt: skip
    fields["normalize"] = normalize
    fields["zero_infinity"] = criterion.get("zero_infinity")  # ctc criterion
    return _drop_none(fields), "ctc"


def _check_wav2vec2_name(name: Any, where: str) -> None:
    if name is not None and not str(name).startswith("wav2vec2"):
        raise ConversionError(
            f"unsupported fairseq {where} {name!r}: only wav2vec 2.0 / XLS-R models (_name 'wav2vec2') convert"
        )


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's `conv_feature_layers` string -> [(dim, kernel, stride), ...], without `eval`.

    Accepts list/tuple literals of integers combined with `+` (concatenation) and `* n` (repetition).
    """

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Tuple):
            return tuple(value(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
                return left + right
            if isinstance(node.op, ast.Mult):
                seq, n = (left, right) if isinstance(left, list) else (right, left)
                if isinstance(seq, list) and type(n) is int and 0 <= n <= 1000:
                    return seq * n
        raise ConversionError(f"unsupported expression {ast.unparse(node)!r} in conv_feature_layers {spec!r}")

    try:
        tree = ast.parse(str(spec).strip(), mode="eval")
    except SyntaxError as e:
        raise ConversionError(f"conv_feature_layers {spec!r} is not a list expression: {e}") from None
    layers = value(tree.body)
    if not isinstance(layers, list) or not layers or not all(
        isinstance(t, tuple) and len(t) == 3 and all(type(x) is int and x > 0 for x in t) for t in layers
    ):
        raise ConversionError(f"conv_feature_layers {spec!r} is not a non-empty list of (dim, kernel, stride)")
    return layers


def fairseq_to_config(model_cfg: Mapping[str, Any], **overrides: Any) -> Wav2Vec2Config:
    """fairseq wav2vec 2.0 model fields (fairseq defaults where absent) -> `Wav2Vec2Config`."""
    c = {**_FAIRSEQ_DEFAULTS, **_drop_none(_plain(dict(model_cfg)))}
    unsupported = []
    if c["layer_type"] != "transformer":
        unsupported.append(f"layer_type={c['layer_type']!r} (only 'transformer')")
    if c["pos_conv_depth"] != 1:
        unsupported.append(f"pos_conv_depth={c['pos_conv_depth']} (only 1)")
    if c["quantizer_depth"] != 1:
        unsupported.append(f"quantizer_depth={c['quantizer_depth']} (only 1)")
    if c["quantize_input"]:
        unsupported.append("quantize_input=True")
    if c["activation_fn"] not in _ACTIVATIONS:
        unsupported.append(f"activation_fn={c['activation_fn']!r} (supported: {sorted(_ACTIVATIONS)})")
    if c["extractor_mode"] not in ("default", "layer_norm"):
        unsupported.append(f"extractor_mode={c['extractor_mode']!r} (only 'default' or 'layer_norm')")
    if unsupported:
        raise ConversionError("unsupported fairseq wav2vec 2.0 settings: " + "; ".join(unsupported))
    conv = parse_conv_layers(c["conv_feature_layers"])
    hidden = int(c["encoder_embed_dim"])
    final_dim = int(c["final_dim"]) if int(c["final_dim"]) > 0 else hidden
    codevector_dim = int(c["latent_dim"]) if int(c["latent_dim"]) > 0 else final_dim
    fields: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": int(c["encoder_layers"]),
        "num_attention_heads": int(c["encoder_attention_heads"]),
        "intermediate_size": int(c["encoder_ffn_embed_dim"]),
        "hidden_act": _ACTIVATIONS[c["activation_fn"]],
        "hidden_dropout": float(c["dropout"]),
        "attention_dropout": float(c["attention_dropout"]),
        "activation_dropout": float(c["activation_dropout"]),
        "feat_proj_dropout": float(c["dropout_input"]),
        "feat_quantizer_dropout": float(c["dropout_features"]),
        "layerdrop": float(c["encoder_layerdrop"]),
        "layer_norm_eps": 1e-5,  # fairseq LayerNorm / GroupNorm default
        "feat_extract_norm": "layer" if c["extractor_mode"] == "layer_norm" else "group",
        "feat_extract_activation": "gelu",  # fairseq's conv feature encoder always uses GELU
        "conv_dim": tuple(d for d, _, _ in conv),
        "conv_kernel": tuple(k for _, k, _ in conv),
        "conv_stride": tuple(s for _, _, s in conv),
        "conv_bias": bool(c["conv_bias"]),
        "num_conv_pos_embeddings": int(c["conv_pos"]),
        "num_conv_pos_embedding_groups": int(c["conv_pos_groups"]),
        "do_stable_layer_norm": bool(c["layer_norm_first"]),
        "mask_time_prob": float(c["mask_prob"]),
        "mask_time_length": int(c["mask_length"]),
        "mask_feature_prob": float(c["mask_channel_prob"]),
        "mask_feature_length": int(c["mask_channel_length"]),
        "num_codevectors_per_group": int(c["latent_vars"]),
        "num_codevector_groups": int(c["latent_groups"]),
        "codevector_dim": codevector_dim,
        "proj_codevector_dim": final_dim,
        "contrastive_logits_temperature": float(c["logit_temp"]),
        "num_negatives": int(c["num_negatives"]),
        "feature_grad_mult": float(c["feature_grad_mult"]),
        "do_normalize": bool(c["normalize"]),
    }
    if "final_dropout" in c:
        fields["final_dropout"] = float(c["final_dropout"])
    if "apply_mask" in c:
        fields["apply_spec_augment"] = bool(c["apply_mask"])
    if c.get("loss_weights"):  # fairseq's extra losses: [diversity, feature penalty]
        fields["diversity_loss_weight"] = float(c["loss_weights"][0])
    if "zero_infinity" in c:
        fields["ctc_zero_infinity"] = bool(c["zero_infinity"])
    if fields["mask_time_prob"] <= 0.0 and fields["mask_feature_prob"] <= 0.0:
        # fairseq always has `mask_emb`; Hugging Face creates `masked_spec_embed` only when a masking
        # probability is set. Keep the embedding (fairseq's pretraining mask_prob) and switch masking
        # off instead, which is what a zero probability meant.
        log.info("mask_prob and mask_channel_prob are 0: keeping mask_emb with mask_time_prob=0.65, "
                 "apply_spec_augment=False")  # fmt: skip
        fields["mask_time_prob"] = _FAIRSEQ_DEFAULTS["mask_prob"]
        fields["apply_spec_augment"] = False
    return Wav2Vec2Config(**{**fields, **overrides})


# ---- state dict -----------------------------------------------------------------------------------

_I = r"(\d+)"
_WB = r"(weight|bias)"
# fairseq key (relative to the wav2vec 2.0 model) -> Hugging Face key under `wav2vec2.`.
_ENCODER_KEYS = [
    (rf"feature_extractor\.conv_layers\.{_I}\.0\.{_WB}", r"feature_extractor.conv_layers.\1.conv.\2"),
    (rf"feature_extractor\.conv_layers\.{_I}\.2\.1\.{_WB}", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (rf"feature_extractor\.conv_layers\.{_I}\.2\.{_WB}", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (rf"post_extract_proj\.{_WB}", r"feature_projection.projection.\1"),
    (rf"layer_norm\.{_WB}", r"feature_projection.layer_norm.\1"),
    (r"mask_emb", r"masked_spec_embed"),
    (r"encoder\.pos_conv\.0\.(weight_g|weight_v|bias)", r"encoder.pos_conv_embed.conv.\1"),
    (r"encoder\.pos_conv\.0\.parametrizations\.weight\.original([01])",
     r"encoder.pos_conv_embed.conv.parametrizations.weight.original\1"),
    (rf"encoder\.layer_norm\.{_WB}", r"encoder.layer_norm.\1"),
    (rf"encoder\.layers\.{_I}\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.{_WB}",
     r"encoder.layers.\1.attention.\2.\3"),
    (rf"encoder\.layers\.{_I}\.self_attn_layer_norm\.{_WB}", r"encoder.layers.\1.layer_norm.\2"),
    (rf"encoder\.layers\.{_I}\.fc1\.{_WB}", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (rf"encoder\.layers\.{_I}\.fc2\.{_WB}", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (rf"encoder\.layers\.{_I}\.final_layer_norm\.{_WB}", r"encoder.layers.\1.final_layer_norm.\2"),
]  # fmt: skip
# Pretraining head: fairseq key -> Hugging Face key (top level).
_PRETRAINING_KEYS = [
    (r"quantizer\.vars", r"quantizer.codevectors"),
    (rf"quantizer\.weight_proj\.{_WB}", r"quantizer.weight_proj.\1"),
    (rf"project_q\.{_WB}", r"project_q.\1"),
    (rf"final_proj\.{_WB}", r"project_hid.\1"),
]
_ENCODER_KEYS = [(re.compile(p), r) for p, r in _ENCODER_KEYS]
_PRETRAINING_KEYS = [(re.compile(p), r) for p, r in _PRETRAINING_KEYS]
_CTC_PREFIX = "w2v_encoder.w2v_model."
# Pretraining modules fairseq's Wav2VecEncoder removes; a CTC model never uses them.
_CTC_UNUSED = re.compile(r"(quantizer|input_quantizer|project_q|project_inp|final_proj|target_glu)\..*")
# Buffers with no weights the model needs.
_NO_WEIGHTS = re.compile(r"(.*\.)?(_float_tensor|version|label_embs_concat)")
_POS_CONV_PLAIN = "encoder.pos_conv.0.weight"
_POS_CONV_G = "wav2vec2.encoder.pos_conv_embed.conv.weight_g"
_POS_CONV_V = "wav2vec2.encoder.pos_conv_embed.conv.weight_v"


def fairseq_state_dict_to_hf(sd: Mapping[str, Any], head: str) -> dict[str, np.ndarray]:
    """fairseq state dict -> Hugging Face `Wav2Vec2ForPreTraining` / `Wav2Vec2ForCTC` keys, float32 numpy.

    Raises ConversionError on any key that carries weights and has no Hugging Face counterpart.
    """
    if head not in FAIRSEQ_HEADS:
        raise ConversionError(f"fairseq head must be one of {FAIRSEQ_HEADS}, got {head!r}")
    out: dict[str, np.ndarray] = {}
    unknown, skipped = [], []
    for key, value in sd.items():
        if head == "ctc":
            if key.startswith(_CTC_PREFIX):
                inner = key[len(_CTC_PREFIX):]
                if _CTC_UNUSED.fullmatch(inner):
                    skipped.append(key)
                    continue
                new = _rename(inner, _ENCODER_KEYS, "wav2vec2.")
            else:
                m = re.fullmatch(r"w2v_encoder\.proj\.(weight|bias)", key)
                new, inner = ("lm_head." + m[1] if m else None), None
        else:
            inner = key
            new = _rename(key, _ENCODER_KEYS, "wav2vec2.") or _rename(key, _PRETRAINING_KEYS, "")
        if new is None and inner == _POS_CONV_PLAIN:
            # weight norm folded away: split back into magnitude (norm over dims 0, 1) and direction.
            w = _to_numpy(value)
            out[_POS_CONV_G] = np.sqrt((w.astype(np.float64) ** 2).sum(axis=(0, 1), keepdims=True)).astype(np.float32)
            out[_POS_CONV_V] = w
            continue
        if new is None:
            (skipped if _NO_WEIGHTS.fullmatch(key) else unknown).append(key)
            continue
        out[new] = _to_numpy(value)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} fairseq key(s) with no Hugging Face / xlsr-jax counterpart for a {head!r} model: "
            + _preview(unknown)
        )
    if head == "pretraining" and "quantizer.codevectors" not in out:
        raise ConversionError(
            "this pretraining checkpoint has no quantizer.vars: only wav2vec 2.0 models trained with "
            "quantized targets (quantize_targets=True, as every released wav2vec 2.0 / XLS-R) convert"
        )
    if head == "ctc" and "lm_head.weight" not in out:
        raise ConversionError("CTC checkpoint has no w2v_encoder.proj.weight (the CTC output layer)")
    if skipped:
        log.info("dropping %d fairseq key(s) the %r model does not use: %s", len(skipped), head, _preview(skipped))
    return out


def _rename(key: str, table: list[tuple[re.Pattern, str]], prefix: str) -> str | None:
    for pattern, replacement in table:
        if m := pattern.fullmatch(key):
            return prefix + m.expand(replacement)
    return None


# ---- CTC vocabulary -------------------------------------------------------------------------------

_FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary(): bos, pad, eos, unk


def read_fairseq_dict(path: str | pathlib.Path) -> list[str]:
    """Symbols of a fairseq dictionary file (`dict.ltr.txt`: `token count` per line), specials first."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"fairseq dictionary not found: {path}")
    symbols, seen = list(_FAIRSEQ_SPECIALS), set(_FAIRSEQ_SPECIALS)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rstrip().rsplit(" ", 1)
        overwrite = len(parts) == 2 and parts[1] == "#fairseq:overwrite"
        if overwrite:
            parts = parts[0].rsplit(" ", 1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ConversionError(f"{path}:{lineno}: expected '<token> <count>', got {line!r}")
        word = parts[0]
        if word in seen and not overwrite:
            raise ConversionError(f"{path}:{lineno}: duplicate token {word!r} (fairseq needs '#fairseq:overwrite')")
        symbols.append(word)
        seen.add(word)
    return symbols


def checkpoint_dictionary(ckpt: Mapping[str, Any]) -> list[str] | None:
    """Symbols of the target dictionary a CTC checkpoint stores in `task_state`, if any."""
    task_state = ckpt.get("task_state")
    if not isinstance(task_state, Mapping):
        return None
    dictionary = task_state.get("target_dictionary")
    symbols = dictionary.get("symbols") if isinstance(dictionary, Mapping) else getattr(dictionary, "symbols", None)
    return [str(s) for s in symbols] if symbols is not None else None


def ctc_vocab(symbols: Sequence[str]) -> dict[str, int]:
    """fairseq symbols -> `Wav2Vec2CTCTokenizer` vocab ({token: index}) with the CTC blank (index 0) named `<pad>`.

    fairseq's CTC blank is index 0, the bos symbol `<s>`; Hugging Face decodes the pad token as the blank,
    so the names of indices 0 and 1 swap, as in transformers' fairseq conversion script.
    """
    names = list(symbols)
    if len(names) < 2:
        raise ConversionError(f"a CTC dictionary needs at least 2 symbols, got {names}")
    if names[:2] != ["<s>", "<pad>"]:
        log.warning("fairseq dictionary starts with %s, not ['<s>', '<pad>']: the CTC blank will be named %r",
                    names[:2], names[1])  # fmt: skip
    names[0], names[1] = names[1], names[0]
    vocab: dict[str, int] = {}
    for index, name in enumerate(names):
        vocab[name] = index  # a repeated token keeps its last index, like fairseq's `indices`
    return vocab


# ---- end to end -----------------------------------------------------------------------------------


def fairseq_to_jax(
    checkpoint: str | pathlib.Path,
    output: str | pathlib.Path,
    dict_path: str | pathlib.Path | None = None,
    trust_pickle: bool = False,
    **config_overrides: Any,
) -> pathlib.Path:
    """Convert a fairseq wav2vec 2.0 / XLS-R checkpoint (pretraining or CTC) into an xlsr-jax model directory."""
    ckpt = load_fairseq_checkpoint(checkpoint, trust_pickle=trust_pickle)
    model_cfg, head = fairseq_model_config(ckpt)
    hf_sd = fairseq_state_dict_to_hf(ckpt["model"], head)
    symbols = None
    if head == "ctc":
        vocab_size = hf_sd["lm_head.weight"].shape[0]
        # Hugging Face's CTC convention: pad (the blank) 0, bos 1, eos 2 (see `ctc_vocab`).
        config_overrides = {"vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                            **config_overrides}  # fmt: skip
        symbols = read_fairseq_dict(dict_path) if dict_path is not None else checkpoint_dictionary(ckpt)
        if symbols is not None and len(symbols) != vocab_size:
            raise ConversionError(
                f"the dictionary has {len(symbols)} symbols but the CTC output layer has {vocab_size} rows"
                + (f" ({dict_path})" if dict_path is not None else " (task_state)")
            )
    config = fairseq_to_config(model_cfg, **config_overrides)
    proj = "wav2vec2.feature_projection.projection."
    if proj + "weight" not in hf_sd and config.conv_dim[-1] == config.hidden_size:
        # fairseq has no post_extract_proj when the conv width equals the model width: an identity.
        hf_sd[proj + "weight"] = np.eye(config.hidden_size, dtype=np.float32)
        hf_sd[proj + "bias"] = np.zeros(config.hidden_size, np.float32)
    params = state_dict_to_params(hf_sd, config, head, strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        extra_files = []
        if head == "ctc":
            if symbols is None:
                log.warning("no CTC vocabulary: the checkpoint has no task_state dictionary and no dict file was "
                            "given (--dict dict.ltr.txt); vocab.json is not written")  # fmt: skip
            else:
                vocab_path = pathlib.Path(tmp) / "vocab.json"
                vocab_path.write_text(json.dumps(ctc_vocab(symbols), ensure_ascii=False, indent=2) + "\n")
                extra_files.append(vocab_path)
        return save_model_dir(output, config, params, head, extra_files=extra_files)


# ---- helpers --------------------------------------------------------------------------------------


def _plain(x: Any) -> Any:
    """Namespaces and dict-likes -> dicts, numpy scalars -> Python scalars, recursively."""
    if isinstance(x, argparse.Namespace):
        x = vars(x)
    if isinstance(x, Mapping) or (hasattr(x, "items") and hasattr(x, "keys")):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def _resolve(tree: dict[str, Any], roots: list[dict[str, Any]]) -> dict[str, Any]:
    """Replace OmegaConf interpolations ("${task.normalize}") left in saved configs by their values, or None."""

    def lookup(path: str) -> Any:
        for root in roots:
            node: Any = root
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                return node
        return None

    out = {}
    for k, v in tree.items():
        if isinstance(v, str) and (m := _INTERPOLATION.fullmatch(v)):
            v = lookup(m[1])
        out[k] = v
    return out


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (fp16 checkpoints included)
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _preview(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


__all__ = [
    "DictionaryStub", "checkpoint_dictionary", "ctc_vocab", "fairseq_model_config", "fairseq_state_dict_to_hf",
    "fairseq_to_config", "fairseq_to_jax", "load_fairseq_checkpoint", "parse_conv_layers", "read_fairseq_dict",
]  # fmt: skip
