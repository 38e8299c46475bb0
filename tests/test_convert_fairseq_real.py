"""fairseq import against fairseq itself: checkpoints its trainer wrote, outputs its models computed.

The golden files in tests/fixtures/fairseq come from real fairseq (`make_fixtures.py` there says how):
tiny models trained for a few updates by `fairseq-hydra-train`, in both layer-norm variants, and their
eval-mode outputs on one padded two-utterance batch. Here fairseq is not importable: the checkpoints go
through our safe loader and converter only, and our model must reproduce fairseq's numbers.
"""

import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.audio import normalize
from xlsr_jax.convert.fairseq import fairseq_to_jax
from xlsr_jax.model_dir import load_model_dir
from xlsr_jax.models.heads import build_model

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "fairseq"
TOL = 1e-4
# name -> (head, feat_extract_norm, do_stable_layer_norm, do_normalize), as the fairseq configs set them.
MODELS = {
    "pt_ln": ("pretraining", "layer", True, True),
    "pt_gn": ("pretraining", "group", False, False),
    "ft_ln": ("ctc", "layer", True, True),
    "ft_gn": ("ctc", "group", False, False),
}


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_matches_fairseq(name, tmp_path, monkeypatch):
    ref = dict(np.load(FIXTURES / f"{name}.npz"))
    # A None entry makes `import fairseq` fail, so only our stand-ins can unpickle the checkpoint.
    monkeypatch.setitem(sys.modules, "fairseq", None)
    model_dir = fairseq_to_jax(FIXTURES / f"{name}.pt", tmp_path / name)
    config, head, params = load_model_dir(model_dir)

    expected_head, norm, stable, do_normalize = MODELS[name]
    assert (head, config.feat_extract_norm, config.do_stable_layer_norm) == (expected_head, norm, stable)
    assert config.do_normalize == bool(ref["normalize"]) == do_normalize

    lengths = ref["lengths"]
    if do_normalize:
        # fairseq normalized each utterance before padding (F.layer_norm, eps 1e-5); our pipeline's
        # `normalize` (Hugging Face's, eps 1e-7) agrees on unit-variance audio.
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(normalize(ref["raw"][b, :n]), ref["source"][b, :n], atol=TOL, rtol=0)
    else:
        assert "raw" not in ref  # the stored source is the raw batch

    # fairseq's padding_mask is True on padding; our attention_mask is 1 on real samples.
    attention_mask = (~ref["padding_mask"]).astype(np.int32)
    np.testing.assert_array_equal(attention_mask.sum(1), lengths)
    out = build_model(config, head).apply({"params": params}, jnp.asarray(ref["source"]), jnp.asarray(attention_mask))

    real = ~ref["frame_padding_mask"]  # [B, T] frames fairseq treats as real
    np.testing.assert_array_equal(real.sum(1), config.num_frames(lengths))
    if head == "ctc":
        ours = {"logits": out.logits}
    else:
        ours = {
            "x": out.encoder.last_hidden_state,
            "final_proj": out.projected_states,
            "q": out.quantizer.codevectors,
            "project_q": out.projected_quantized_states,
        }
    diffs = {}
    for key, value in ours.items():
        value = np.asarray(value)
        assert value.shape == ref[key].shape, (key, value.shape, ref[key].shape)
        diffs[key] = float(np.abs(value[real] - ref[key][real]).max())
    print(f"{name}: max abs diff to fairseq on real frames: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert max(diffs.values()) < TOL, diffs
    if head == "pretraining":
        np.testing.assert_array_equal(np.asarray(out.quantizer.codes)[real], ref["targets"][real])
    else:
        symbols = [str(s) for s in ref["symbols"]]
        vocab = json.loads((model_dir / "vocab.json").read_text())
        assert vocab["<pad>"] == 0 and vocab["<s>"] == 1  # fairseq's blank (index 0) named as HF's pad
        assert {i: t for t, i in vocab.items()} == dict(enumerate(["<pad>", "<s>", *symbols[2:]]))
        assert len(symbols) == config.vocab_size == ref["logits"].shape[-1]
