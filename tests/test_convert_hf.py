"""Directory-level conversion: HF dir -> xlsr-jax model dir -> HF dir, via the CLI and the Python API."""

import json

import numpy as np
import pytest
from hf_helpers import batch, hf_forward, random_hf_model, state_dict, transformers

from xlsr_jax.cli import main
from xlsr_jax.config import HF_ARCHITECTURES, get_preset
from xlsr_jax.convert.hf import hf_to_jax, jax_to_hf
from xlsr_jax.model_dir import ModelDirError, load_model_dir, read_config


def _save_hf(tmp_path, config, head, legacy=False):
    model = random_hf_model(config, head)
    out = tmp_path / f"hf_{head}"
    model.save_pretrained(out)
    if legacy:  # rewrite the positional-conv weight-norm keys the pre-parametrizations way
        from safetensors.numpy import load_file, save_file

        sd = load_file(out / "model.safetensors")
        prefix = "" if head == "base" else "wav2vec2."
        base = prefix + "encoder.pos_conv_embed.conv."
        sd[base + "weight_g"] = sd.pop(base + "parametrizations.weight.original0")
        sd[base + "weight_v"] = sd.pop(base + "parametrizations.weight.original1")
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return model, out


HEAD_CONFIGS = [
    ("base", get_preset("tiny")),
    ("ctc", get_preset("tiny_base")),
    ("sequence_classification", get_preset("tiny", num_labels=3, id2label=("en", "de", "cmn"),
                                           use_weighted_layer_sum=True)),
    ("pretraining", get_preset("tiny")),
]


@pytest.mark.parametrize("head,config", HEAD_CONFIGS, ids=[h for h, _ in HEAD_CONFIGS])
@pytest.mark.parametrize("legacy", [False, True], ids=["parametrizations", "weight_g_v"])
def test_hf_dir_round_trip(tmp_path, head, config, legacy):
    model, hf_dir = _save_hf(tmp_path, config, head, legacy=legacy)
    model_dir = hf_to_jax(hf_dir, tmp_path / "ours")
    cfg, got_head, _ = load_model_dir(model_dir)
    assert got_head == head
    assert cfg.to_hf_dict() == config.to_hf_dict() | {"id2label": cfg.to_hf_dict()["id2label"],
                                                       "label2id": cfg.to_hf_dict()["label2id"]}
    out = jax_to_hf(model_dir, tmp_path / "back", legacy_weight_norm=legacy)
    cls = getattr(transformers, HF_ARCHITECTURES[head])
    reloaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    original, back = state_dict(model), state_dict(reloaded)
    assert sorted(original) == sorted(back)
    for key in original:
        np.testing.assert_array_equal(back[key], original[key], err_msg=key)
    if head == "sequence_classification":
        assert reloaded.config.id2label == {0: "en", 1: "de", 2: "cmn"}
    # The re-exported model computes what the original does.
    audio, mask = batch()
    a, b = hf_forward(model.eval(), audio, mask), hf_forward(reloaded.eval(), audio, mask)
    first = "logits" if head in ("ctc", "sequence_classification") else (
        "projected_states" if head == "pretraining" else "last_hidden_state")
    np.testing.assert_array_equal(getattr(a, first).numpy(), getattr(b, first).numpy())


def test_cli_convert_both_ways_and_errors(tmp_path, capsys):
    _, hf_dir = _save_hf(tmp_path, get_preset("tiny"), "ctc")
    (hf_dir / "vocab.json").write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}))
    assert main(["convert", "hf-to-jax", "--input", str(hf_dir), "--output", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "vocab.json").is_file()
    assert read_config(tmp_path / "m")[1] == "ctc"
    assert main(["convert", "jax-to-hf", "--input", str(tmp_path / "m"), "--output", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h" / "vocab.json").read_text())["<pad>"] == 0
    prep = json.loads((tmp_path / "h" / "preprocessor_config.json").read_text())
    assert prep["do_normalize"] is True and prep["return_attention_mask"] is True
    transformers.Wav2Vec2Processor.from_pretrained(tmp_path / "h")  # tokenizer + feature extractor load

    # Refuses to overwrite; a missing input and a non-model directory give one clear line each.
    capsys.readouterr()
    assert main(["convert", "hf-to-jax", "--input", str(hf_dir), "--output", str(tmp_path / "m")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["convert", "hf-to-jax", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["convert", "jax-to-hf", "--input", str(hf_dir), "--output", str(tmp_path / "y")]) == 2
    assert "convert it first" in capsys.readouterr().err.lower()


def test_unrolled_load_of_stacked_dir(tmp_path):
    config = get_preset("tiny")
    _, hf_dir = _save_hf(tmp_path, config, "base")
    model_dir = hf_to_jax(hf_dir, tmp_path / "ours")
    _, _, params = load_model_dir(model_dir, scan_layers=False)
    assert "layers_1" in params["wav2vec2"]["encoder"] and "layers" not in params["wav2vec2"]["encoder"]
    with pytest.raises(ModelDirError):
        load_model_dir(tmp_path / "missing")


def test_half_precision_checkpoint_keeps_float32_compute(tmp_path):
    """transformers 5 stores the storage dtype as "dtype"; it must not become our compute dtype."""
    import torch

    model = random_hf_model(get_preset("tiny"), "base").to(torch.float16)
    model.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text()).get("dtype") == "float16"
    cfg, _, params = load_model_dir(hf_to_jax(tmp_path / "hf", tmp_path / "ours"))
    assert cfg.dtype == "float32"
    leaf = params["wav2vec2"]["encoder"]["layers"]["attention"]["q_proj"]["kernel"]
    assert leaf.dtype == np.float32
