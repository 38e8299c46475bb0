"""fairseq checkpoint import: parity with Hugging Face on random weights, config mapping, safe loading, CTC vocab.

fairseq itself is not needed: random Hugging Face models are written out in fairseq's layout through a
test-local inverse of the key table, wrapped the way fairseq's trainer saves checkpoints.
"""

import argparse
import collections
import contextlib
import json
import logging
import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from xlsr_jax.config import get_preset
from xlsr_jax.convert.fairseq import (
    ConversionError,
    ctc_vocab,
    fairseq_model_config,
    fairseq_state_dict_to_hf,
    fairseq_to_config,
    fairseq_to_jax,
    load_fairseq_checkpoint,
    parse_conv_layers,
    read_fairseq_dict,
)
from xlsr_jax.convert.hf import state_dict_to_params
from xlsr_jax.model_dir import load_model_dir
from xlsr_jax.models.heads import build_model

TOL = 1e-4
# A fairseq letter dictionary with 32 entries (the tiny presets' vocab_size): 4 specials + 28 tokens.
TOKENS = ["|", *"ETAOINSHRDLUCMFWYGPBVKXJQZ", "'"]
SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", *TOKENS]
ARCH_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "feat_extract_norm", "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "num_conv_pos_embeddings",
    "num_conv_pos_embedding_groups", "do_stable_layer_norm", "num_codevectors_per_group",
    "num_codevector_groups", "codevector_dim", "proj_codevector_dim", "layer_norm_eps",
)  # fmt: skip


# ---- building fairseq-layout checkpoints from Hugging Face models (test-local inverse table) --------


def hf_to_fairseq_state_dict(hf_sd, head, layer_norm_extractor):
    """Hugging Face state dict -> fairseq keys, the inverse of the converter's table, written independently."""
    # fairseq: Sequential(conv, dropout, norm, gelu); a LayerNorm sits inside Sequential(transpose, LN, transpose).
    conv_norm = r"feature_extractor.conv_layers.\1.2" + (".1" if layer_norm_extractor else "") + r".\2"
    rules = [
        (r"wav2vec2\.feature_extractor\.conv_layers\.(\d+)\.conv\.(\w+)", r"feature_extractor.conv_layers.\1.0.\2"),
        (r"wav2vec2\.feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(\w+)", conv_norm),
        (r"wav2vec2\.feature_projection\.projection\.(\w+)", r"post_extract_proj.\1"),
        (r"wav2vec2\.feature_projection\.layer_norm\.(\w+)", r"layer_norm.\1"),
        (r"wav2vec2\.masked_spec_embed", "mask_emb"),
        (r"wav2vec2\.encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", "encoder.pos_conv.0.weight_g"),  # noqa: E501
        (r"wav2vec2\.encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", "encoder.pos_conv.0.weight_v"),  # noqa: E501
        (r"wav2vec2\.encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
        (r"wav2vec2\.encoder\.layer_norm\.(\w+)", r"encoder.layer_norm.\1"),
        (r"wav2vec2\.encoder\.layers\.(\d+)\.attention\.(\w+)\.(\w+)", r"encoder.layers.\1.self_attn.\2.\3"),
        (r"wav2vec2\.encoder\.layers\.(\d+)\.layer_norm\.(\w+)", r"encoder.layers.\1.self_attn_layer_norm.\2"),
        (r"wav2vec2\.encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(\w+)", r"encoder.layers.\1.fc1.\2"),
        (r"wav2vec2\.encoder\.layers\.(\d+)\.feed_forward\.output_dense\.(\w+)", r"encoder.layers.\1.fc2.\2"),
        (r"wav2vec2\.encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"encoder.layers.\1.final_layer_norm.\2"),
        (r"quantizer\.codevectors", "quantizer.vars"),
        (r"quantizer\.weight_proj\.(\w+)", r"quantizer.weight_proj.\1"),
        (r"project_q\.(\w+)", r"project_q.\1"),
        (r"project_hid\.(\w+)", r"final_proj.\1"),
        (r"lm_head\.(\w+)", r"w2v_encoder.proj.\1"),
    ]  # fmt: skip
    out = {}
    for key, value in hf_sd.items():
        new = next(m.expand(r) for p, r in rules if (m := re.fullmatch(p, key)))
        if head == "ctc" and not new.startswith("w2v_encoder."):
            new = "w2v_encoder.w2v_model." + new
        out[new] = value.detach().clone()
    assert len(out) == len(hf_sd)
    return out


def fairseq_model_fields(cfg):
    """fairseq Wav2Vec2Config fields (as a trainer checkpoint stores them) describing `cfg`."""
    layers = list(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride))
    assert layers[1:5] == [layers[1]] * 4 and layers[5] == layers[6]
    return {
        "_name": "wav2vec2",
        "extractor_mode": "layer_norm" if cfg.feat_extract_norm == "layer" else "default",
        "encoder_layers": cfg.num_hidden_layers,
        "encoder_embed_dim": cfg.hidden_size,
        "encoder_ffn_embed_dim": cfg.intermediate_size,
        "encoder_attention_heads": cfg.num_attention_heads,
        "activation_fn": "gelu",
        "layer_type": "transformer",
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "activation_dropout": 0.0,
        "encoder_layerdrop": 0.05,
        "dropout_input": 0.1,
        "dropout_features": 0.1,
        "final_dim": cfg.proj_codevector_dim,
        "layer_norm_first": cfg.do_stable_layer_norm,
        "conv_feature_layers": f"[{layers[0]}] + [{layers[1]}] * 4 + [{layers[5]}] * 2",
        "conv_bias": cfg.conv_bias,
        "logit_temp": 0.1,
        "quantize_targets": True,
        "quantize_input": False,
        "target_glu": False,
        "feature_grad_mult": 0.1,
        "quantizer_depth": 1,
        "latent_vars": cfg.num_codevectors_per_group,
        "latent_groups": cfg.num_codevector_groups,
        "latent_dim": cfg.codevector_dim,
        "mask_prob": 0.65,
        "mask_length": 10,
        "mask_channel_prob": 0.0,
        "mask_channel_length": 10,
        "num_negatives": 100,
        "conv_pos": cfg.num_conv_pos_embeddings,
        "conv_pos_groups": cfg.num_conv_pos_embedding_groups,
        "pos_conv_depth": 1,
        "latent_temp": [2.0, 0.5, 0.999995],
    }


@contextlib.contextmanager
def fake_fairseq_dictionary():
    """A class pickled as `fairseq.data.dictionary.Dictionary` (a fake module exists while saving)."""

    class Dictionary:
        pass

    Dictionary.__module__ = "fairseq.data.dictionary"
    Dictionary.__qualname__ = "Dictionary"
    modules = {name: types.ModuleType(name) for name in ("fairseq", "fairseq.data", "fairseq.data.dictionary")}
    modules["fairseq.data.dictionary"].Dictionary = Dictionary
    with pytest.MonkeyPatch.context() as mp:
        for name, module in modules.items():
            mp.setitem(sys.modules, name, module)
        d = Dictionary()
        d.__dict__.update(
            bos_word="<s>", pad_word="<pad>", eos_word="</s>", unk_word="<unk>", symbols=list(SYMBOLS),
            count=[1] * len(SYMBOLS), indices={s: i for i, s in enumerate(SYMBOLS)}, bos_index=0, pad_index=1,
            eos_index=2, unk_index=3, nspecial=4,
        )  # fmt: skip
        yield d


def random_hf_model(cfg, head, seed=0):
    torch.manual_seed(seed)
    cls = transformers.Wav2Vec2ForPreTraining if head == "pretraining" else transformers.Wav2Vec2ForCTC
    model = cls(transformers.Wav2Vec2Config(**cfg.to_hf_dict())).eval()
    with torch.no_grad():  # HF inits norms to 1/0 and biases to 0: perturb so swapped keys would show
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def write_fairseq_checkpoint(path, cfg, head, hf_model, task_state=True):
    sd = hf_to_fairseq_state_dict(hf_model.state_dict(), head, cfg.feat_extract_norm == "layer")
    model_fields = fairseq_model_fields(cfg)
    pretrain_task = {"_name": "audio_pretraining", "normalize": cfg.do_normalize, "sample_rate": 16000}
    if head == "pretraining":
        criterion = {"_name": "wav2vec", "loss_weights": [0.2, 10.0], "infonce": True}
        ckpt = {"cfg": {"model": model_fields, "task": pretrain_task, "criterion": criterion},
                "model": sd, "optimizer_history": [{"num_updates": 10}], "task_state": {}}  # fmt: skip
        torch.save(ckpt, path)
        return path
    ctc_fields = {
        "_name": "wav2vec_ctc", "w2v_path": "/nonexistent/pretrain.pt", "w2v_args": {"model": model_fields,
        "task": pretrain_task}, "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.1,
        "dropout_input": 0.0, "final_dropout": 0.05, "apply_mask": True, "mask_prob": 0.5,
        "mask_channel_prob": 0.25, "mask_channel_length": 64, "layerdrop": 0.1, "feature_grad_mult": 0.0,
        "normalize": "${task.normalize}",  # saved configs keep OmegaConf interpolations
    }  # fmt: skip
    task = {"_name": "audio_finetuning", "normalize": cfg.do_normalize, "labels": "ltr"}
    with fake_fairseq_dictionary() as dictionary:
        criterion = {"_name": "ctc", "zero_infinity": True, "sentence_avg": True}
        ckpt = {"cfg": {"model": ctc_fields, "task": task, "criterion": criterion}, "model": sd,
                "task_state": {"target_dictionary": dictionary} if task_state else {}}  # fmt: skip
        torch.save(ckpt, path)
    return path


_CACHE = {}


@pytest.fixture(scope="module")
def fairseq_checkpoint(tmp_path_factory):
    """(path, hf_model, cfg) for a (preset, head), built once per module."""

    def make(preset, head):
        if (preset, head) not in _CACHE:
            cfg = get_preset(preset)
            hf_model = random_hf_model(cfg, head)
            path = tmp_path_factory.mktemp("fairseq") / f"{preset}_{head}.pt"
            _CACHE[preset, head] = (write_fairseq_checkpoint(path, cfg, head, hf_model), hf_model, cfg)
        return _CACHE[preset, head]

    yield make
    _CACHE.clear()


def audio_batch():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 8000).astype(np.float32)
    mask = np.ones((2, 8000), np.int64)
    mask[1, 5000:] = 0
    x[1, 5000:] = 0.0
    return x, mask


def max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


# ---- parity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["pretraining", "ctc"])
@pytest.mark.parametrize("preset", ["tiny", "tiny_base"])
def test_converted_fairseq_checkpoint_matches_hugging_face(fairseq_checkpoint, tmp_path, preset, head):
    path, hf_model, cfg = fairseq_checkpoint(preset, head)
    config, loaded_head, params = load_model_dir(fairseq_to_jax(path, tmp_path / "model"))
    assert loaded_head == head
    assert {f: getattr(config, f) for f in ARCH_FIELDS} == {f: getattr(cfg, f) for f in ARCH_FIELDS}
    assert config.do_normalize == cfg.do_normalize
    if head == "pretraining":
        assert config.diversity_loss_weight == 0.2  # from the criterion's loss_weights

    x, mask = audio_batch()
    out = build_model(config, head).apply({"params": params}, jnp.asarray(x), jnp.asarray(mask))
    xt, mt = torch.from_numpy(x), torch.from_numpy(mask)
    with torch.no_grad():
        if head == "ctc":
            diffs = {"logits": max_diff(out.logits, hf_model(xt, attention_mask=mt).logits)}
        else:
            ref = hf_model(xt, attention_mask=mt)
            base = hf_model.wav2vec2(xt, attention_mask=mt)
            codevectors, _ = hf_model.quantizer(base.extract_features)
            diffs = {
                "last_hidden_state": max_diff(out.encoder.last_hidden_state, base.last_hidden_state),
                "projected_states": max_diff(out.projected_states, ref.projected_states),
                "codevectors": max_diff(out.quantizer.codevectors, codevectors),
                "projected_quantized_states": max_diff(out.projected_quantized_states, ref.projected_quantized_states),
            }
    print(f"fairseq parity {preset}/{head}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) <= TOL, diffs


def test_ctc_fine_tuning_fields_override_the_pretrained_encoder(fairseq_checkpoint):
    path, _, cfg = fairseq_checkpoint("tiny_base", "ctc")
    fields, head = fairseq_model_config(load_fairseq_checkpoint(path))
    assert head == "ctc"
    config = fairseq_to_config(fields, vocab_size=len(SYMBOLS))
    assert config.num_hidden_layers == cfg.num_hidden_layers
    dropouts = (config.hidden_dropout, config.activation_dropout, config.layerdrop, config.final_dropout)
    assert dropouts == (0.0, 0.1, 0.1, 0.05)
    assert (config.mask_time_prob, config.mask_feature_prob, config.mask_feature_length) == (0.5, 0.25, 64)
    assert config.feature_grad_mult == 0.0 and config.apply_spec_augment and config.ctc_zero_infinity
    assert config.do_normalize == cfg.do_normalize  # "${task.normalize}" resolved


# ---- config mapping ----------------------------------------------------------------------------------


def test_conv_feature_layers_are_parsed_without_eval():
    expected = [(512, 10, 5), *[(512, 3, 2)] * 4, (512, 2, 2), (512, 2, 2)]
    assert parse_conv_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2") == expected
    assert parse_conv_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]") == expected
    for bad in ("__import__('os').system('true')", "[(512, 10)]", "[(512, 10, 5)] * 10**9", "[(512, 10, 5)"):
        with pytest.raises(ConversionError, match="conv_feature_layers"):
            parse_conv_layers(bad)


def test_fairseq_defaults_and_field_mapping():
    c = fairseq_to_config({})  # fairseq defaults: wav2vec 2.0 base layout, final_dim 0 -> embed dim
    assert (c.feat_extract_norm, c.conv_bias, c.do_stable_layer_norm) == ("group", False, False)
    assert c.conv_kernel == (10, 3, 3, 3, 3, 2, 2) and c.conv_stride == (5, 2, 2, 2, 2, 2, 2)
    assert c.proj_codevector_dim == 768 and c.codevector_dim == 768
    assert (c.num_conv_pos_embeddings, c.num_conv_pos_embedding_groups) == (128, 16)
    assert c.has_masked_spec_embed and c.mask_time_prob == 0.65

    base = fairseq_to_config({"final_dim": 256, "encoder_layerdrop": 0.05, "dropout_input": 0.1,
                              "dropout_features": 0.1, "feature_grad_mult": 0.1})  # fmt: skip
    assert {f: getattr(base, f) for f in ARCH_FIELDS} == {f: getattr(get_preset("base"), f) for f in ARCH_FIELDS}
    dropouts = (base.layerdrop, base.feat_proj_dropout, base.feat_quantizer_dropout, base.feature_grad_mult)
    assert dropouts == (0.05, 0.1, 0.1, 0.1)

    xlsr = fairseq_to_config({
        "extractor_mode": "layer_norm", "layer_norm_first": True, "conv_bias": True, "encoder_layers": 24,
        "encoder_embed_dim": 1024, "encoder_ffn_embed_dim": 4096, "encoder_attention_heads": 16,
        "final_dim": 768, "latent_dim": 0, "normalize": True,
        "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2",
    })  # fmt: skip
    assert {f: getattr(xlsr, f) for f in ARCH_FIELDS} == {f: getattr(get_preset("xlsr_300m"), f) for f in ARCH_FIELDS}
    assert xlsr.do_normalize

    masked_off = fairseq_to_config({"mask_prob": 0.0, "mask_channel_prob": 0.0})
    assert masked_off.has_masked_spec_embed and not masked_off.apply_spec_augment
    assert fairseq_to_config({"activation_fn": "gelu_accurate"}).hidden_act == "gelu_new"
    for bad in ({"activation_fn": "tanh"}, {"layer_type": "conformer"}, {"quantize_input": True}):
        with pytest.raises(ConversionError, match="unsupported"):
            fairseq_to_config(bad)


def test_legacy_ctc_namespace_config():
    w2v = argparse.Namespace(arch="wav2vec2", encoder_layers=3, encoder_embed_dim=64, dropout=0.1,
                             mask_prob=np.float64(0.65), normalize=True)  # fmt: skip
    args = argparse.Namespace(arch="wav2vec_ctc", w2v_args=w2v, dropout=0.0, layerdrop=0.1, final_dropout=0.2,
                              apply_mask=True, normalize=True, mask_prob=0.5)  # fmt: skip
    fields, head = fairseq_model_config({"args": args, "model": {}})
    assert head == "ctc"
    assert (fields["encoder_layers"], fields["dropout"], fields["encoder_layerdrop"]) == (3, 0.0, 0.1)
    assert (fields["final_dropout"], fields["mask_prob"], fields["normalize"]) == (0.2, 0.5, True)
    no_encoder = {"cfg": {"model": {"_name": "wav2vec_ctc", "w2v_args": None, "w2v_path": "x.pt"}}, "model": {}}
    with pytest.raises(ConversionError, match="w2v_args"):
        fairseq_model_config(no_encoder)
    with pytest.raises(ConversionError, match="hubert"):
        fairseq_model_config({"cfg": {"model": {"_name": "hubert"}}, "model": {}})


# ---- state dict --------------------------------------------------------------------------------------


def test_state_dict_renaming_drops_buffers_and_refuses_unknown_weights(fairseq_checkpoint):
    path, _, _ = fairseq_checkpoint("tiny", "pretraining")
    sd = dict(load_fairseq_checkpoint(path)["model"])
    g, v = sd.pop("encoder.pos_conv.0.weight_g"), sd.pop("encoder.pos_conv.0.weight_v")
    weight = g * v / v.norm(dim=(0, 1), keepdim=True)
    sd["encoder.pos_conv.0.weight"] = weight  # weight norm folded away
    sd["encoder._float_tensor"] = torch.zeros(1)
    hf = fairseq_state_dict_to_hf(sd, "pretraining")
    g2 = hf["wav2vec2.encoder.pos_conv_embed.conv.weight_g"]
    v2 = hf["wav2vec2.encoder.pos_conv_embed.conv.weight_v"]
    np.testing.assert_allclose(g2 * v2 / np.linalg.norm(v2, axis=(0, 1), keepdims=True), weight.numpy(), atol=1e-6)
    assert not any("_float_tensor" in k for k in hf)

    with pytest.raises(ConversionError, match=r"encoder\.layers\.0\.adapter\.weight"):
        fairseq_state_dict_to_hf({**sd, "encoder.layers.0.adapter.weight": torch.zeros(2)}, "pretraining")
    no_quantizer = {k: t for k, t in sd.items() if not k.startswith("quantizer.")}
    with pytest.raises(ConversionError, match="quantize_targets"):
        fairseq_state_dict_to_hf(no_quantizer, "pretraining")
    # A CTC model drops the pretraining modules fairseq's Wav2VecEncoder removes.
    ctc_sd = {"w2v_encoder.w2v_model." + k: t for k, t in sd.items()}
    ctc_sd["w2v_encoder.proj.weight"], ctc_sd["w2v_encoder.proj.bias"] = torch.zeros(5, 32), torch.zeros(5)
    ctc = fairseq_state_dict_to_hf(ctc_sd, "ctc")
    assert not any(k.startswith(("quantizer.", "project_")) for k in ctc) and ctc["lm_head.weight"].shape == (5, 32)


# ---- loading -----------------------------------------------------------------------------------------


def test_legacy_args_checkpoint_loads_with_weights_only(tmp_path):
    cfg = get_preset("tiny_base")
    hf_model = random_hf_model(cfg, "pretraining", seed=1)
    fields = {k: v for k, v in fairseq_model_fields(cfg).items() if k != "_name"}
    fields.update(mask_prob=np.float64(0.65), latent_vars=np.int64(cfg.num_codevectors_per_group))
    args = argparse.Namespace(arch="wav2vec2", task="audio_pretraining", normalize=False, lr=[np.float64(5e-4)],
                              **fields)  # fmt: skip
    sd = hf_to_fairseq_state_dict(hf_model.state_dict(), "pretraining", layer_norm_extractor=False)
    path = tmp_path / "legacy.pt"
    torch.save({"args": args, "model": sd, "optimizer_history": [{"num_updates": 1}]}, path)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(path, weights_only=True)  # plain torch refuses the Namespace

    ckpt = load_fairseq_checkpoint(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].mask_prob == 0.65
    config, head, params = load_model_dir(fairseq_to_jax(path, tmp_path / "model"))
    assert head == "pretraining" and config.num_codevectors_per_group == cfg.num_codevectors_per_group
    json.dumps(config.to_dict())  # numpy scalars did not leak into the config
    expected = state_dict_to_params({k: v.numpy() for k, v in hf_model.state_dict().items()}, config, "pretraining")
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, params), expected)


def test_unknown_globals_are_refused_unless_trusted(tmp_path):
    path = tmp_path / "deque.pt"
    torch.save({"model": {}, "extra_state": collections.deque([1, 2])}, path)
    with pytest.raises(ConversionError, match="collections.deque") as err:
        load_fairseq_checkpoint(path)
    assert "trust" in str(err.value)
    assert load_fairseq_checkpoint(path, trust_pickle=True)["extra_state"] == collections.deque([1, 2])


def test_code_running_pickle_is_refused(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo this-must-not-run",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": RunsCode()}, path)
    with pytest.raises(ConversionError, match=r"system.*trust"):
        load_fairseq_checkpoint(path)


def test_missing_or_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(ConversionError, match="not found"):
        load_fairseq_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="could not read"):
        load_fairseq_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ConversionError, match="not a fairseq checkpoint"):
        load_fairseq_checkpoint(tmp_path / "plain.pt")


# ---- CTC vocabulary ----------------------------------------------------------------------------------


def test_ctc_vocab_from_task_state_and_dict_file(fairseq_checkpoint, tmp_path, caplog):
    path, _, _ = fairseq_checkpoint("tiny_base", "ctc")
    expected = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{t: i + 4 for i, t in enumerate(TOKENS)}}

    out = fairseq_to_jax(path, tmp_path / "from_task_state")
    assert json.loads((out / "vocab.json").read_text()) == expected
    config, _, _ = load_model_dir(out)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id, config.vocab_size) == (0, 1, 2, 32)

    lower = [t.lower() for t in TOKENS]
    dict_file = tmp_path / "dict.ltr.txt"
    dict_file.write_text("".join(f"{t} {1000 - i}\n" for i, t in enumerate(lower)))
    assert read_fairseq_dict(dict_file)[:5] == ["<s>", "<pad>", "</s>", "<unk>", "|"]
    out = fairseq_to_jax(path, tmp_path / "from_dict", dict_path=dict_file)  # the file wins over task_state
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab == {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{t: i + 4 for i, t in enumerate(lower)}}

    short = tmp_path / "short.txt"
    short.write_text("a 1\nb 1\n")
    with pytest.raises(ConversionError, match="6 symbols but the CTC output layer has 32"):
        fairseq_to_jax(path, tmp_path / "bad", dict_path=short)

    # Trusted (plain pickle) loading still reads the dictionary without fairseq installed.
    ckpt = load_fairseq_checkpoint(path, trust_pickle=True)
    assert ckpt["task_state"]["target_dictionary"].symbols == SYMBOLS
    ckpt.pop("task_state")
    torch.save(ckpt, tmp_path / "no_task_state.pt")
    with caplog.at_level(logging.WARNING, logger="xlsr_jax.convert.fairseq"):
        out = fairseq_to_jax(tmp_path / "no_task_state.pt", tmp_path / "no_vocab")
    assert not (out / "vocab.json").exists()
    assert "vocab.json" in caplog.text


def test_ctc_vocab_swaps_blank_and_bos():
    assert ctc_vocab(["<s>", "<pad>", "</s>", "<unk>", "a"]) == {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4}
