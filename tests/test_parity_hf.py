"""Numerical parity with Hugging Face transformers (PyTorch) on random weights, float32 on CPU."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_helpers import batch, hf_forward, random_hf_model, state_dict

from xlsr_jax.config import get_preset
from xlsr_jax.convert.hf import params_to_state_dict, state_dict_to_params
from xlsr_jax.models.heads import build_model

TOL = 1e-4
# (conv norm, transformer variant): the four combinations, on tiny widths with the full conv stack.
VARIANTS = {
    "layer-stable": get_preset("tiny"),
    "group-post": get_preset("tiny_base"),
    "layer-post": get_preset("tiny", do_stable_layer_norm=False),
    "group-stable": get_preset("tiny_base", do_stable_layer_norm=True),
}


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))



@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_ctc_parity(variant, scan, record_property):
    config = VARIANTS[variant].replace(scan_layers=scan)
    hf = random_hf_model(config, "ctc")
    params = state_dict_to_params(state_dict(hf), config, "ctc")
    audio, mask = batch()
    theirs = hf_forward(hf, audio, mask)
    ours = build_model(config, "ctc").apply({"params": params}, jnp.asarray(audio), jnp.asarray(mask),
                                            output_hidden_states=True)
    diffs = {"logits": _max_diff(ours.logits, theirs.logits.numpy())}
    assert len(ours.encoder.hidden_states) == len(theirs.hidden_states) == config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(ours.encoder.hidden_states, theirs.hidden_states)):
        diffs[f"hidden_states[{i}]"] = _max_diff(a, b.numpy())
    record_property("max_abs_diff", diffs)
    print(variant, "scan" if scan else "unrolled", diffs)
    assert max(diffs.values()) < TOL, diffs
    # The padded utterance really is shorter: its frame mask ends where HF's conv arithmetic says.
    assert int(np.asarray(ours.encoder.frame_mask)[1].sum()) == config.num_frames(int(mask[1].sum()))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_base_model_parity(variant):
    config = VARIANTS[variant]
    hf = random_hf_model(config, "base")
    params = state_dict_to_params(state_dict(hf), config, "base")
    audio, mask = batch()
    theirs = hf_forward(hf, audio, mask)
    ours = build_model(config, "base").apply({"params": params}, jnp.asarray(audio), jnp.asarray(mask),
                                             output_hidden_states=True)
    diffs = {
        "last_hidden_state": _max_diff(ours.last_hidden_state, theirs.last_hidden_state.numpy()),
        "extract_features": _max_diff(ours.extract_features, theirs.extract_features.numpy()),
    }
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        diffs[f"hidden_states[{i}]"] = _max_diff(a, b.numpy())
    print(variant, diffs)
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("weighted", [False, True], ids=["last", "weighted_layer_sum"])
def test_sequence_classification_parity(variant, weighted):
    config = VARIANTS[variant].replace(num_labels=5, use_weighted_layer_sum=weighted)
    hf = random_hf_model(config, "sequence_classification")
    params = state_dict_to_params(state_dict(hf), config, "sequence_classification")
    audio, mask = batch()
    theirs = hf_forward(hf, audio, mask)
    ours = build_model(config, "sequence_classification").apply(
        {"params": params}, jnp.asarray(audio), jnp.asarray(mask))
    diff = _max_diff(ours.logits, theirs.logits.numpy())
    print(variant, weighted, diff)
    assert ours.logits.shape == (2, 5)
    assert diff < TOL


@pytest.mark.parametrize("variant", ["layer-stable", "group-post"])
def test_pretraining_head_parity(variant):
    """Eval-mode (argmax) quantizer, time mask applied: projected states and quantized targets match."""
    config = VARIANTS[variant]
    hf = random_hf_model(config, "pretraining")
    params = state_dict_to_params(state_dict(hf), config, "pretraining")
    audio, mask = batch()
    frames = config.num_frames(audio.shape[1])
    time_mask = np.zeros((2, frames), bool)
    time_mask[:, 3:9] = True
    time_mask[0, 20:25] = True
    import torch

    theirs = hf_forward(hf, audio, mask, mask_time_indices=torch.tensor(time_mask))
    ours = build_model(config, "pretraining").apply(
        {"params": params}, jnp.asarray(audio), jnp.asarray(mask), mask_time_indices=jnp.asarray(time_mask))
    diffs = {
        "projected_states": _max_diff(ours.projected_states, theirs.projected_states.numpy()),
        "projected_quantized_states": _max_diff(ours.projected_quantized_states,
                                                theirs.projected_quantized_states.numpy()),
    }
    print(variant, diffs)
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("head", ["base", "ctc", "sequence_classification", "pretraining"])
def test_state_dict_round_trip_is_exact(head):
    config = VARIANTS["layer-stable"].replace(use_weighted_layer_sum=head == "sequence_classification")
    hf = random_hf_model(config, head)
    sd = state_dict(hf)
    back = params_to_state_dict(state_dict_to_params(sd, config, head), config, head)
    assert sorted(back) == sorted(sd)
    for key in sd:
        np.testing.assert_array_equal(back[key], sd[key], err_msg=key)


def test_mismatched_checkpoint_is_reported():
    from xlsr_jax.convert.hf import ConversionError

    config = VARIANTS["layer-stable"]
    sd = state_dict(random_hf_model(config, "ctc"))
    del sd["wav2vec2.encoder.layers.1.attention.q_proj.weight"]
    sd["wav2vec2.encoder.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError, match=r"missing key.*layers\.1\.attention\.q_proj\.weight"):
        state_dict_to_params(sd, config, "ctc")
    with pytest.raises(ConversionError, match="shape mismatch"):
        state_dict_to_params(state_dict(random_hf_model(config, "ctc")), config.replace(vocab_size=40), "ctc")
