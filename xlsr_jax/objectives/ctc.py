"""CTC fine-tuning objective (the blank is token 0, `<pad>`, as in Hugging Face's CTC tokenizer)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax


def ctc_feasible(labels: jax.Array, num_frames: jax.Array) -> jax.Array:
    """[B] bool: whether each row's labels can be aligned to its frames.

    A CTC path emits every label and needs a blank between two equal consecutive labels, so it
    needs labels + repeats <= frames (e.g. "aab" needs 4 frames: a, blank, a, b).
    """
    valid = labels >= 0
    repeats = jnp.sum((labels[:, 1:] == labels[:, :-1]) & valid[:, 1:] & valid[:, :-1], axis=-1)
    return jnp.sum(valid, axis=-1) + repeats <= num_frames


def forward(model, params, batch, rng, deterministic: bool):
    """The CTC head's output on a batch; training-mode SpecAugment masks come from the batch."""
    rngs = None if deterministic else {"dropout": rng}
    masks = {} if deterministic else {k: batch[k] for k in ("mask_time_indices", "mask_feature_indices") if k in batch}
    return model.apply({"params": params}, batch["input_values"], batch["attention_mask"],
                       deterministic=deterministic, rngs=rngs, **masks)


def per_utterance_loss(logits, frame_mask, labels, blank_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """([B] CTC negative log-likelihood, zero where infeasible; [B] bool feasible)."""
    logit_paddings = 1.0 - frame_mask.astype(jnp.float32)
    label_paddings = (labels < 0).astype(jnp.float32)
    per_utt = optax.ctc_loss(logits, logit_paddings, jnp.maximum(labels, 0), label_paddings, blank_id=blank_id)
    feasible = ctc_feasible(labels, jnp.sum(frame_mask, axis=-1))
    return jnp.where(feasible, per_utt, 0.0), feasible


@flax.struct.dataclass
class CtcObjective:
    """(loss_sum, denominator, metrics) for the train step.

    The denominator is the number of target tokens (fairseq `sentence_avg=False`) or of utterances
    (`sentence_avg=True`), counting only feasible rows. Infeasible rows (see `ctc_feasible`) get a
    zero loss and no gradient (fairseq's and HF's `zero_infinity`; optax would report a huge finite
    loss for them) and are counted in the `infeasible` metric.
    """

    blank_id: int = flax.struct.field(pytree_node=False, default=0)
    sentence_avg: bool = flax.struct.field(pytree_node=False, default=False)

    def __call__(self, model, params, batch, step, rng, deterministic=False):
        del step
        out = forward(model, params, batch, rng, deterministic)
        per_utt, feasible = per_utterance_loss(out.logits, out.encoder.frame_mask, batch["labels"], self.blank_id)
        tokens = jnp.sum(jnp.where(feasible, jnp.sum(batch["labels"] >= 0, axis=-1), 0)).astype(jnp.float32)
        utterances = jnp.sum(feasible).astype(jnp.float32)
        loss_sum = jnp.sum(per_utt)
        denom = utterances if self.sentence_avg else tokens
        metrics = {"ctc_loss_per_token": loss_sum / jnp.maximum(tokens, 1.0), "num_tokens": tokens,
                   "num_utterances": utterances, "infeasible": jnp.sum(~feasible).astype(jnp.float32)}
        return loss_sum, denom, metrics


def greedy_ids(logits: jax.Array, frame_mask: jax.Array, blank_id: int = 0) -> list[list[int]]:
    """Best-path CTC decoding: argmax per frame, collapse repeats, drop blanks (host side)."""
    import numpy as np

    best = np.asarray(jnp.argmax(logits, -1))
    mask = np.asarray(frame_mask)
    return [collapse(row[m], blank_id) for row, m in zip(best, mask)]


def collapse(frame_ids, blank_id: int = 0) -> list[int]:
    """One row of per-frame best ids -> label ids (repeats merged, blanks dropped)."""
    ids, prev = [], None
    for t in frame_ids:
        t = int(t)
        if t != prev and t != blank_id:
            ids.append(t)
        prev = t
    return ids
