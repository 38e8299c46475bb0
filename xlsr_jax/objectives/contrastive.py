"""The wav2vec 2.0 pretraining loss: InfoNCE over masked frames + codebook diversity + feature penalty.

Distractor logits are gathered from one [B, T, T] cosine-similarity matrix per batch instead of
materializing [K, B, T, D] negative vectors (fairseq and Hugging Face do the latter: 100 copies of
every target). Memory is O(T^2) scalars, e.g. 4 MB per 20 s utterance, instead of O(K T D).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from xlsr_jax.config import Wav2Vec2Config
from xlsr_jax.models.heads import PreTrainingOutput


@flax.struct.dataclass
class PretrainingBatch:
    """What the input pipeline provides for one pretraining step (all static shapes)."""

    input_values: jax.Array  # [B, samples] float32
    attention_mask: jax.Array  # [B, samples] int32, 1 on real samples
    mask_time_indices: jax.Array  # [B, T] bool, from `compute_span_mask`
    sampled_negatives: jax.Array  # [B, T, K] int32 frame indices, from `sample_negatives`


def gumbel_temperature(step, start: float = 2.0, floor: float = 0.5, decay: float = 0.999995):
    """fairseq's latent_temp schedule: max(start * decay**step, floor)."""
    # exp(step * log(decay)) with the log in float64: 0.999995 itself is not representable in float32.
    return jnp.maximum(start * jnp.exp(jnp.asarray(step, jnp.float32) * math.log(decay)), floor)


def _perplexity(probs: jax.Array, weights: jax.Array) -> jax.Array:
    """Sum over groups of exp(entropy) of the weighted-average distribution ([..., G, V], weights [...])."""
    w = weights.astype(jnp.float32)[..., None, None]
    marginal = (probs * w).sum(axis=tuple(range(probs.ndim - 2))) / jnp.maximum(w.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(marginal > 0, marginal * jnp.log(jnp.where(marginal > 0, marginal, 1.0)), 0.0), -1)
    return jnp.exp(entropy).sum()


def _normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def contrastive_loss(
    outputs: PreTrainingOutput,
    mask_time_indices: jax.Array,
    sampled_negatives: jax.Array,
    config: Wav2Vec2Config,
    feature_penalty_weight: float = 0.0,
    perplexity_groups: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, metrics) with sum reduction over masked frames, as fairseq's `wav2vec` criterion.

    total = InfoNCE + diversity_loss_weight * diversity * num_masked + feature_penalty_weight * pen * num_masked

    `perplexity_groups` = S splits the batch rows into S contiguous groups (a batch shard's rows
    each, when S is the number of batch shards) with a codebook perplexity and diversity term each,
    weighted by the group's masked frames: fairseq computes them per GPU, a stronger push to use
    the whole codebook than the global batch's perplexity. The metrics report the mean over groups,
    as fairseq logs the mean over workers.
    """
    mask = mask_time_indices.astype(bool)
    num_masked = mask.sum().astype(jnp.float32)
    pred = _normalize(outputs.projected_states)
    target = _normalize(outputs.projected_quantized_states)
    temp = config.contrastive_logits_temperature

    sim = jnp.einsum("btd,bsd->bts", pred, target, preferred_element_type=jnp.float32) / temp
    positive = jnp.diagonal(sim, axis1=1, axis2=2)  # [B, T]
    negative = jnp.take_along_axis(sim, sampled_negatives, axis=2)  # [B, T, K]
    # A distractor with the positive's codes in every group is the same vector: not a distractor.
    codes = outputs.quantizer.codes  # [B, T, G]
    neg_codes = jax.vmap(lambda c, idx: c[idx])(codes, sampled_negatives)  # [B, T, K, G]
    neg_is_pos = jnp.all(neg_codes == codes[:, :, None, :], axis=-1)
    negative = jnp.where(neg_is_pos, -jnp.inf, negative)
    logits = jnp.concatenate([positive[..., None], negative], axis=-1)  # [B, T, 1 + K]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    infonce = -jnp.sum(jnp.where(mask, log_probs[..., 0], 0.0))

    # Diversity: the soft assignment (no noise, no temperature), averaged over masked frames.
    q = outputs.quantizer
    groups, entries = q.logits.shape[-2:]
    rows = mask.shape[0]
    if perplexity_groups < 1 or rows % perplexity_groups:
        raise ValueError(f"perplexity_groups={perplexity_groups} does not divide the {rows} rows of a (micro-)batch")

    def per_group(x):  # [B, ...] -> [S, B / S, ...]
        return x.reshape(perplexity_groups, rows // perplexity_groups, *x.shape[1:])

    soft = per_group(jax.nn.softmax(q.logits, axis=-1))
    hard = per_group(jax.nn.one_hot(jnp.argmax(q.logits, -1), entries))
    group_mask = per_group(mask)
    prob_ppl = jax.vmap(_perplexity)(soft, group_mask)  # [S]
    code_ppl = jax.vmap(_perplexity)(hard, group_mask)
    num_vars = groups * entries
    group_masked = group_mask.sum(axis=(1, 2)).astype(jnp.float32)
    # sum_s diversity_s * masked_s, written as one diversity times num_masked as with a single group.
    diversity = jnp.sum((num_vars - prob_ppl) / num_vars * group_masked) / jnp.maximum(num_masked, 1.0)
    prob_perplexity, code_perplexity = prob_ppl.mean(), code_ppl.mean()

    # fairseq's features_pen: mean squared conv feature (here over real frames only).
    feats = outputs.encoder.conv_features.astype(jnp.float32)
    real = outputs.encoder.frame_mask if outputs.encoder.frame_mask is not None else jnp.ones(feats.shape[:2], bool)
    penalty = jnp.sum(jnp.where(real[..., None], feats**2, 0.0)) / jnp.maximum(real.sum() * feats.shape[-1], 1)

    loss = infonce + config.diversity_loss_weight * diversity * num_masked + feature_penalty_weight * penalty * num_masked

    # Accuracy as fairseq counts it: the positive is the unique argmax.
    best = jnp.argmax(logits, -1) == 0
    worst = jnp.argmin(logits, -1) == 0
    correct = jnp.sum(jnp.where(mask, best & ~worst, False))
    metrics = {
        "loss": loss,
        "contrastive_loss": infonce,
        "diversity_loss": diversity,
        "feature_penalty": penalty,
        "prob_perplexity": prob_perplexity,
        "code_perplexity": code_perplexity,
        "accuracy": correct / jnp.maximum(num_masked, 1.0),
        "num_masked": num_masked,
    }
    return loss, metrics


def pretraining_loss(
    model,
    params,
    batch: PretrainingBatch,
    temperature: float | jax.Array,
    rng: jax.Array | None = None,
    deterministic: bool = False,
    feature_penalty_weight: float = 0.0,
    perplexity_groups: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Forward the pretraining head on a batch and return (loss, metrics).

    Training (`deterministic=False`) needs `rng`: it is split into the dropout and Gumbel streams.
    Evaluation uses argmax codes and no dropout.
    """
    rngs = None
    if not deterministic:
        if rng is None:
            raise ValueError("training-mode pretraining_loss needs an rng")
        dropout_key, gumbel_key = jax.random.split(rng)
        rngs = {"dropout": dropout_key, "gumbel": gumbel_key}
    outputs = model.apply(
        {"params": params},
        batch.input_values,
        batch.attention_mask,
        mask_time_indices=batch.mask_time_indices,
        temperature=temperature,
        deterministic=deterministic,
        rngs=rngs,
    )
    loss, metrics = contrastive_loss(
        outputs, batch.mask_time_indices, batch.sampled_negatives, model.config, feature_penalty_weight,
        perplexity_groups,
    )
    metrics["temperature"] = jnp.asarray(temperature, jnp.float32)
    return loss, metrics


@flax.struct.dataclass
class ContrastiveObjective:
    """The pretraining objective as the train step calls it: (loss_sum, denominator, metrics).

    The denominator is the masked-frame count: gradients are divided by it, as fairseq divides by
    sample_size. Temperatures follow `gumbel_temperature(step, ...)`.
    """

    gumbel_start: float = flax.struct.field(pytree_node=False, default=2.0)
    gumbel_floor: float = flax.struct.field(pytree_node=False, default=0.5)
    gumbel_decay: float = flax.struct.field(pytree_node=False, default=0.999995)
    feature_penalty_weight: float = flax.struct.field(pytree_node=False, default=0.0)
    perplexity_groups: int = flax.struct.field(pytree_node=False, default=1)  # see `contrastive_loss`

    def __call__(self, model, params, batch, step, rng, deterministic=False):
        if not isinstance(batch, PretrainingBatch):
            batch = PretrainingBatch(batch["input_values"], batch["attention_mask"], batch["mask_time_indices"],
                                     batch["sampled_negatives"])
        tau = gumbel_temperature(step, self.gumbel_start, self.gumbel_floor, self.gumbel_decay)
        loss, metrics = pretraining_loss(model, params, batch, tau, rng, deterministic, self.feature_penalty_weight,
                                         self.perplexity_groups)
        metrics = dict(metrics)
        metrics.pop("loss")  # the step reports the normalized total
        metrics["contrastive_loss"] = metrics["contrastive_loss"] / jnp.maximum(metrics["num_masked"], 1.0)
        return loss, metrics["num_masked"], metrics
