"""Fine-tuning starts from converted models: a Hugging Face directory and a fairseq checkpoint.

With `model.init_from` the architecture is the converted directory's own (not the smoke preset's), the
encoder starts as exactly the converted weights, and the run pins that architecture so `export` works
after the converted directory is gone. The runs keep the encoder frozen throughout
(`optim.freeze_encoder_steps` past the last step), so its final parameters must still be the converted ones.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from hf_helpers import random_hf_model

from xlsr_jax.cli import main
from xlsr_jax.config import ConfigError, Wav2Vec2Config, get_preset
from xlsr_jax.convert.fairseq import fairseq_to_jax
from xlsr_jax.convert.hf import hf_to_jax
from xlsr_jax.experiment import load_experiment
from xlsr_jax.model_dir import load_model_dir, read_config
from xlsr_jax.train.loop import INIT_CONFIG, train_and_evaluate

FAIRSEQ = pathlib.Path(__file__).parent / "fixtures" / "fairseq"
CTC = "experiments/finetune_ctc.py:smoke"
STEPS = 2
# Architecture fields the smoke preset ("tiny") sets differently from every converted model below.
ARCH = ("hidden_size", "feat_extract_norm", "do_stable_layer_norm", "conv_bias")


def _arch(config: Wav2Vec2Config) -> dict:
    return {k: getattr(config, k) for k in ("num_hidden_layers", "intermediate_size", *ARCH)}


def _config(experiment: str, init_from, data_dir, *overrides):
    config = load_experiment(experiment, [
        f"--config.model.init_from={init_from}", f"--config.data.dir={data_dir}",
        f"--config.train.steps={STEPS}", "--config.train.eval_every=0", "--config.data.num_buckets=1", *overrides])
    config.optim.freeze_encoder_steps = 100  # the encoder never trains: it must end as it started
    return config


def _assert_trees_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def _finetune_and_export(tmp_path, experiment, converted, data_dir, head):
    """Fine-tune from `converted`, delete it, export: (converted config, exported config)."""
    converted_config, _, converted_params = load_model_dir(converted)
    result = train_and_evaluate(_config(experiment, converted, data_dir), tmp_path / "run")

    assert result.step == STEPS
    losses = [h["loss"] for h in result.history]
    assert losses and np.isfinite(losses).all(), losses
    params = jax.device_get(result.state.params)
    encoder = dict(params["wav2vec2"])
    if "masked_spec_embed" not in converted_params["wav2vec2"]:
        # Saved without masking: SpecAugment fine-tuning adds a fresh embedding, the rest is converted.
        fresh = encoder.pop("masked_spec_embed")
        assert fresh.shape == (converted_config.hidden_size,) and np.isfinite(fresh).all() and np.any(fresh)
    _assert_trees_equal(encoder, converted_params["wav2vec2"])
    head_params = [k for k in params if k != "wav2vec2"]
    assert head_params  # the task's head, trained from scratch while the encoder stays frozen
    pinned = Wav2Vec2Config.from_dict(json.loads((tmp_path / "run" / INIT_CONFIG).read_text()))
    assert _arch(pinned) == _arch(converted_config)

    shutil.rmtree(converted)  # export must not need the pretrained directory any more
    out = tmp_path / "exported"
    assert main(["export", "--workdir", str(tmp_path / "run"), "--output", str(out)]) == 0
    exported_config, exported_head, exported_params = load_model_dir(out)
    assert exported_head == head
    assert _arch(exported_config) == _arch(converted_config)
    tiny = get_preset("tiny")
    assert all(getattr(exported_config, k) != getattr(tiny, k) for k in ARCH), _arch(exported_config)
    _assert_trees_equal(exported_params, params)
    return converted_config, exported_config


@pytest.mark.slow
def test_ctc_from_hf_pretraining_dir(tmp_path, data_dir):
    # Group norm, post-LN, no conv bias, 48 wide, 3 layers; saved without masking, so transformers wrote no
    # masked_spec_embed: the SpecAugment fine-tuning run adds a fresh one.
    arch = get_preset("tiny_base", hidden_size=48, num_hidden_layers=3, intermediate_size=80, mask_time_prob=0.0,
                      mask_feature_prob=0.0)
    random_hf_model(arch, "pretraining").save_pretrained(tmp_path / "hf")
    converted = hf_to_jax(tmp_path / "hf", tmp_path / "converted")
    assert read_config(converted)[1] == "pretraining"
    assert "masked_spec_embed" not in load_model_dir(converted)[2]["wav2vec2"]

    _, exported = _finetune_and_export(tmp_path, CTC, converted, data_dir, "ctc")
    vocab = json.loads((tmp_path / "run" / "vocab.json").read_text())
    assert exported.vocab_size == len(vocab) and vocab["<pad>"] == 0
    assert _arch(exported) == _arch(arch)
    assert exported.mask_time_prob == 0.3  # the smoke run's SpecAugment overrides apply on top
    assert "masked_spec_embed" in load_model_dir(tmp_path / "exported")[2]["wav2vec2"]


@pytest.mark.slow
def test_ctc_from_fairseq_pretraining_checkpoint(tmp_path, data_dir):
    # pt_gn (tests/fixtures/fairseq/make_fixtures.py): group norm, post-LN, no conv bias, 48 wide, 2 layers,
    # pretrained on unnormalized audio.
    converted = fairseq_to_jax(FAIRSEQ / "pt_gn.pt", tmp_path / "converted")
    source, exported = _finetune_and_export(tmp_path, CTC, converted, data_dir, "ctc")
    assert _arch(source) == {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 64,
                             "feat_extract_norm": "group", "do_stable_layer_norm": False, "conv_bias": False}
    # The smoke run trains on normalized audio (data.normalize); inference must prepare audio the same way.
    assert not source.do_normalize and exported.do_normalize


def test_init_from_with_a_shape_changing_override_fails_before_anything_compiles(tmp_path, data_dir):
    converted = fairseq_to_jax(FAIRSEQ / "pt_ln.pt", tmp_path / "converted")  # 32 wide
    config = _config(CTC, converted, data_dir, "--config.model.overrides.hidden_size=48")
    # The message names the override to remove.
    with pytest.raises(ConfigError, match=r"change the architecture of model.init_from=.*\(hidden_size\).*remove"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was built or saved
