"""CTC fine-tuning objective (the blank is token 0, `<pad>`, as in Hugging Face's CTC tokenizer)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class CtcObjective:
    """(loss_sum, num_target_tokens, metrics): gradients are per target token (fairseq sentence_avg=False).

    `zero_infinity` drops utterances whose labels cannot be aligned to their frames (more labels
    than frames), as fairseq's and HF's `zero_infinity`; optax reports those as huge finite losses.
    """

    blank_id: int = flax.struct.field(pytree_node=False, default=0)
    zero_infinity: bool = flax.struct.field(pytree_node=False, default=True)

    def __call__(self, model, params, batch, step, rng, deterministic=False):
        del step
        rngs = None if deterministic else {"dropout": rng}
        out = model.apply({"params": params}, batch["input_values"], batch["attention_mask"],
                          mask_time_indices=None if deterministic else batch.get("mask_time_indices"),
                          deterministic=deterministic, rngs=rngs)
        logits = out.logits
        frames = out.encoder.frame_mask
        logit_paddings = 1.0 - frames.astype(jnp.float32)
        labels = batch["labels"]
        label_paddings = (labels < 0).astype(jnp.float32)
        per_utt = optax.ctc_loss(logits, logit_paddings, jnp.maximum(labels, 0), label_paddings, blank_id=self.blank_id)
        num_labels = jnp.sum(labels >= 0, axis=-1)
        feasible = num_labels <= jnp.sum(frames, axis=-1)
        if self.zero_infinity:
            per_utt = jnp.where(feasible, per_utt, 0.0)
        tokens = jnp.sum(jnp.where(feasible, num_labels, 0)).astype(jnp.float32)
        loss_sum = jnp.sum(per_utt)
        # Greedy-decoding frame accuracy proxy is left to evaluation (WER/CER need text decoding).
        metrics = {"ctc_loss": loss_sum / jnp.maximum(tokens, 1.0), "num_tokens": tokens,
                   "infeasible": jnp.sum(~feasible).astype(jnp.float32)}
        return loss_sum, tokens, metrics


def greedy_ids(logits: jax.Array, frame_mask: jax.Array, blank_id: int = 0) -> list[list[int]]:
    """Best-path CTC decoding: argmax per frame, collapse repeats, drop blanks (host side)."""
    import numpy as np

    best = np.asarray(jnp.argmax(logits, -1))
    mask = np.asarray(frame_mask)
    out = []
    for row, m in zip(best, mask):
        ids, prev = [], None
        for t in row[m]:
            if t != prev and t != blank_id:
                ids.append(int(t))
            prev = t
        out.append(ids)
    return out
