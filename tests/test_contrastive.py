"""Pretraining objective: loss parity with Hugging Face `Wav2Vec2ForPreTraining`, bf16 vs fp32.

Gumbel noise differs between frameworks, so both sides are run in training mode with the *same*
injected noise: `torch.nn.functional.gumbel_softmax` is replaced by a hard straight-through
softmax over (logits + our noise) / tau, and our `gumbel_noise` returns that same array. All
dropouts and layerdrop are 0 so the training-mode forward is deterministic on both sides.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_helpers import batch, random_hf_model, state_dict, torch

import xlsr_jax.models.quantizer as quantizer_module
from xlsr_jax.config import get_preset
from xlsr_jax.convert.hf import state_dict_to_params
from xlsr_jax.models.heads import build_model, init_params
from xlsr_jax.objectives.contrastive import PretrainingBatch, contrastive_loss, gumbel_temperature, pretraining_loss
from xlsr_jax.objectives.masking import compute_span_mask, sample_negatives

NO_DROPOUT = dict(hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
                  feat_quantizer_dropout=0.0, layerdrop=0.0, mask_time_prob=0.65)


def _pretraining_batch(config, seed=0, num_negatives=20):
    audio, mask = batch((16000, 11000), seed=seed)
    frames = config.num_frames(audio.shape[1])
    lengths = config.num_frames(mask.sum(1))
    rng = np.random.default_rng(seed)
    time_mask = compute_span_mask(frames, lengths, 0.65, 4, rng, min_masks=2)
    negatives = sample_negatives(time_mask, num_negatives, rng)
    return PretrainingBatch(jnp.asarray(audio), jnp.asarray(mask), jnp.asarray(time_mask), jnp.asarray(negatives))


@pytest.mark.parametrize("preset", ["tiny", "tiny_base"], ids=["layer-stable", "group-post"])
def test_loss_parity_with_hugging_face(preset, monkeypatch):
    config = get_preset(preset, **NO_DROPOUT)
    hf = random_hf_model(config, "pretraining").train()
    params = state_dict_to_params(state_dict(hf), config, "pretraining")
    b = _pretraining_batch(config)
    bsz, frames = b.mask_time_indices.shape
    tau = 1.7
    noise = np.random.default_rng(1).gumbel(size=(bsz, frames, config.num_codevector_groups,
                                                  config.num_codevectors_per_group)).astype(np.float32)

    def injected_gumbel_softmax(logits, tau, hard):
        soft = torch.softmax((logits + torch.from_numpy(noise.reshape(logits.shape))) / tau, dim=-1)
        hard_ = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        return hard_ - soft.detach() + soft

    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", injected_gumbel_softmax)
    monkeypatch.setattr(quantizer_module, "gumbel_noise", lambda key, shape: jnp.asarray(noise).reshape(shape))
    hf.set_gumbel_temperature(tau)
    offsets = (np.arange(bsz) * frames)[:, None, None]
    out = hf(torch.tensor(np.asarray(b.input_values)), attention_mask=torch.tensor(np.asarray(b.attention_mask)),
             mask_time_indices=torch.tensor(np.asarray(b.mask_time_indices)),
             sampled_negative_indices=torch.tensor(np.asarray(b.sampled_negatives) + offsets))
    out.loss.backward()
    model = build_model(config, "pretraining")
    (loss, m), grads = jax.value_and_grad(
        lambda p: pretraining_loss(model, p, b, tau, jax.random.key(0)), has_aux=True)(params)
    # Gradients too (straight-through estimator included): HF's .grad tensors have the parameters'
    # layout, so the same converter maps them onto our tree.
    hf_grads = state_dict_to_params(
        {k: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy() for k, p in hf.named_parameters()},
        config, "pretraining")
    scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(hf_grads))
    grad_diff = max(float(np.abs(np.asarray(a) - b_).max()) for a, b_ in
                    zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(hf_grads)))
    print(preset, "max grad diff / max grad", grad_diff / scale)
    assert grad_diff / scale < 1e-4
    num_masked = float(m["num_masked"])
    ours = {"contrastive": float(m["contrastive_loss"]), "diversity": float(m["diversity_loss"]) * num_masked,
            "perplexity": float(m["prob_perplexity"]), "loss": float(loss)}
    theirs = {"contrastive": out.contrastive_loss.item(), "diversity": out.diversity_loss.item(),
              "perplexity": out.codevector_perplexity.item(), "loss": out.loss.item()}
    rel = {k: abs(ours[k] - theirs[k]) / abs(theirs[k]) for k in ours}
    print(preset, ours, theirs, rel)
    assert num_masked == float(b.mask_time_indices.sum()) > 10
    assert max(rel.values()) < 1e-4, rel


def test_bfloat16_loss_is_finite_and_close_to_float32():
    config = get_preset("tiny", **NO_DROPOUT)
    params = init_params(config, "pretraining")
    b = _pretraining_batch(config)
    results = {}
    for dtype in ("float32", "bfloat16"):
        model = build_model(config.replace(dtype=dtype), "pretraining")
        # One compile per dtype: the loss, its metrics and the gradients from one program.
        (loss, m), grads = jax.jit(jax.value_and_grad(
            lambda p: pretraining_loss(model, p, b, 2.0, deterministic=True), has_aux=True))(params)
        assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
        results[dtype] = {k: float(v) for k, v in m.items()}
    f32, bf16 = results["float32"], results["bfloat16"]
    print("f32", f32, "\nbf16", bf16)
    for key in ("contrastive_loss", "prob_perplexity", "loss"):
        assert abs(bf16[key] - f32[key]) / abs(f32[key]) < 0.02, (key, f32[key], bf16[key])


def test_gumbel_temperature_schedule():
    assert float(gumbel_temperature(0, 2.0, 0.5)) == 2.0
    assert abs(float(gumbel_temperature(100_000, 2.0, 0.5)) - 2.0 * 0.999995**100_000) < 1e-5
    assert float(gumbel_temperature(10_000_000, 2.0, 0.1)) == pytest.approx(0.1)


def test_negative_equal_to_positive_is_masked_out():
    """A distractor carrying the positive's codes contributes nothing (fairseq/HF neg_is_pos)."""
    config = get_preset("tiny", **NO_DROPOUT)
    params = init_params(config, "pretraining")
    b = _pretraining_batch(config)
    model = build_model(config, "pretraining")
    _, m = pretraining_loss(model, params, b, 2.0, deterministic=True)
    # every negative points at the positive itself -> every distractor is "the positive": loss 0
    self_negs = jnp.broadcast_to(jnp.arange(b.sampled_negatives.shape[1])[None, :, None], b.sampled_negatives.shape)
    _, m_self = pretraining_loss(model, params, b.replace(sampled_negatives=self_negs), 2.0, deterministic=True)
    assert float(m["contrastive_loss"]) > 1.0
    assert float(m_self["contrastive_loss"]) == 0.0 and float(m_self["accuracy"]) == 1.0


def test_per_shard_perplexity_matches_a_hand_computation_per_group():
    """perplexity_groups=2 (fairseq's per-GPU codebook perplexity on 2 GPUs): each half of the batch
    gets its own perplexity over its own masked frames, and the diversity term weighs each half by
    its masked frames; groups=1 is the whole batch's perplexity."""
    config = get_preset("tiny", **NO_DROPOUT)
    params = init_params(config, "pretraining")
    b = _pretraining_batch(config)
    model = build_model(config, "pretraining")
    outputs = model.apply({"params": params}, b.input_values, b.attention_mask, mask_time_indices=b.mask_time_indices,
                          temperature=2.0, deterministic=True)
    logits = np.asarray(outputs.quantizer.logits, np.float64)  # [B, T, G, V]
    mask = np.asarray(b.mask_time_indices)

    def ppl(rows):
        p = np.exp(logits[rows] - logits[rows].max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        m = mask[rows]
        marginal = (p * m[..., None, None]).sum((0, 1)) / m.sum()
        return float(np.exp(-(marginal * np.log(marginal)).sum(-1)).sum())

    num_vars = config.num_codevector_groups * config.num_codevectors_per_group
    loss1, m1 = contrastive_loss(outputs, b.mask_time_indices, b.sampled_negatives, config)
    loss2, m2 = contrastive_loss(outputs, b.mask_time_indices, b.sampled_negatives, config, perplexity_groups=2)
    halves = [ppl(slice(0, 1)), ppl(slice(1, 2))]
    assert float(m1["prob_perplexity"]) == pytest.approx(ppl(slice(0, 2)), rel=1e-4)
    assert float(m2["prob_perplexity"]) == pytest.approx(np.mean(halves), rel=1e-4)
    masked = mask.sum(1)
    diversity_sum = sum((num_vars - h) / num_vars * n for h, n in zip(halves, masked))
    expected = float(loss1) + config.diversity_loss_weight * (diversity_sum - float(m1["diversity_loss"]) * masked.sum())
    assert float(loss2) == pytest.approx(expected, rel=1e-4)
    assert float(m2["prob_perplexity"]) < float(m1["prob_perplexity"])  # a half uses fewer codes than the whole
    with pytest.raises(ValueError, match="does not divide"):
        contrastive_loss(outputs, b.mask_time_indices, b.sampled_negatives, config, perplexity_groups=3)
