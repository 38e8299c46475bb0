"""CTC fine-tuning smoke run: init from a pretraining run's export, train, export, load in transformers."""

import json

import jax
import numpy as np
import pytest

from xlsr_jax.cli import main
from xlsr_jax.experiment import load_experiment
from xlsr_jax.model_dir import load_model_dir
from xlsr_jax.train.loop import train_and_evaluate


@pytest.mark.slow
def test_pretrain_export_finetune_export_to_hf(tmp_path):
    transformers = pytest.importorskip("transformers")
    fast = ["--config.train.eval_every=0", "--config.data.num_buckets=1"]
    pre = train_and_evaluate(load_experiment("experiments/pretrain_xlsr.py:smoke", ["--config.train.steps=2", *fast]),
                             tmp_path / "pre")
    assert main(["export", "--workdir", str(tmp_path / "pre"), "--output", str(tmp_path / "pre_model")]) == 0

    config = load_experiment("experiments/finetune_ctc.py:smoke",
                             [f"--config.model.init_from={tmp_path / 'pre_model'}", "--config.train.steps=12",
                              "--config.data.dir=" + str(tmp_path / "pre" / "data"), *fast])
    config.optim.freeze_encoder_steps = 100  # encoder frozen throughout: it must stay the pretrained one
    result = train_and_evaluate(config, tmp_path / "ft")
    losses = [h["loss"] for h in result.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    pretrained = jax.device_get(pre.state.params["wav2vec2"]["encoder"])
    finetuned = jax.device_get(result.state.params["wav2vec2"]["encoder"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, finetuned, pretrained)

    vocab = json.loads((tmp_path / "ft" / "vocab.json").read_text())
    assert vocab["<pad>"] == 0 and "|" in vocab
    assert main(["export", "--workdir", str(tmp_path / "ft"), "--output", str(tmp_path / "ft_model")]) == 0
    cfg, head, _ = load_model_dir(tmp_path / "ft_model")
    assert head == "ctc" and cfg.vocab_size == len(vocab)
    assert main(["convert", "jax-to-hf", "--input", str(tmp_path / "ft_model"), "--output", str(tmp_path / "hf")]) == 0
    model, info = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = transformers.Wav2Vec2Processor.from_pretrained(tmp_path / "hf")
    assert processor.tokenizer.pad_token_id == 0 and model.config.vocab_size == len(vocab)
