"""A tiny model pretrained on real (synthesized) speech learns, and its codebook does not collapse."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data_pipelines.audio import load_audio, normalize, pad_batch
from data_pipelines.corpus import sample_paths
from xlsr_jax.config import get_preset
from xlsr_jax.models.heads import build_model, init_params
from xlsr_jax.objectives.contrastive import PretrainingBatch, gumbel_temperature, pretraining_loss
from xlsr_jax.objectives.masking import compute_span_mask, sample_negatives

STEPS = 150  # loss per frame ~3.5 -> ~0.9 and perplexities ~29 by then: far past every threshold below


@pytest.mark.slow
def test_tiny_pretraining_lowers_contrastive_loss_without_collapse():
    config = get_preset(
        "tiny", hidden_size=64, intermediate_size=128, conv_dim=(64,) * 7, num_codevectors_per_group=32,
        codevector_dim=32, proj_codevector_dim=32, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, layerdrop=0.0, mask_time_prob=0.65, feature_grad_mult=0.1,
    )
    waves = [normalize(load_audio(p)) for p in sample_paths()]
    audio, mask = pad_batch(waves)
    lengths = config.num_frames(mask.sum(1))
    frames = config.num_frames(audio.shape[1])
    model = build_model(config, "pretraining")
    params = init_params(config, "pretraining", seed=0)
    opt = optax.chain(optax.clip_by_global_norm(5.0), optax.adamw(optax.warmup_cosine_decay_schedule(
        0.0, 2e-3, 30, STEPS), b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch, i):
        tau = gumbel_temperature(i, 2.0, 0.5, 0.995)
        (_, metrics), grads = jax.value_and_grad(
            lambda p: pretraining_loss(model, p, batch, tau, jax.random.fold_in(jax.random.key(1), i)),
            has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    rng = np.random.default_rng(0)
    history = []
    for i in range(STEPS):
        time_mask = compute_span_mask(frames, lengths, 0.65, 5, rng, min_masks=2)
        batch = PretrainingBatch(jnp.asarray(audio), jnp.asarray(mask), jnp.asarray(time_mask),
                                 jnp.asarray(sample_negatives(time_mask, 30, rng)))
        params, opt_state, metrics = step(params, opt_state, batch, i)
        history.append({k: float(v) for k, v in metrics.items()})
    per_frame = [h["contrastive_loss"] / h["num_masked"] for h in history]
    first, last = np.mean(per_frame[:10]), np.mean(per_frame[-20:])
    prob_ppl = np.mean([h["prob_perplexity"] for h in history[-20:]])
    code_ppl = np.mean([h["code_perplexity"] for h in history[-20:]])
    accuracy = np.mean([h["accuracy"] for h in history[-20:]])
    print(f"contrastive/frame {first:.3f} -> {last:.3f}; prob ppl {prob_ppl:.1f}, code ppl {code_ppl:.1f} "
          f"(G={config.num_codevector_groups}, G*V={config.num_codevector_groups * config.num_codevectors_per_group});"
          f" accuracy {accuracy:.2f}")
    assert np.isfinite(per_frame).all()
    assert last < 0.6 * first, (first, last)  # ln(31) = 3.43 is chance with 30 distractors
    assert code_ppl > 5 * config.num_codevector_groups, code_ppl  # collapse would be ~G
    assert prob_ppl > 5 * config.num_codevector_groups, prob_ppl
