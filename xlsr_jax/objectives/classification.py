"""Utterance classification objective (language ID): cross-entropy over one label per utterance."""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import optax


def forward(model, params, batch, rng, deterministic: bool):
    """The classification head's output; training-mode SpecAugment masks come from the batch."""
    rngs = None if deterministic else {"dropout": rng}
    masks = {} if deterministic else {k: batch[k] for k in ("mask_time_indices", "mask_feature_indices") if k in batch}
    return model.apply({"params": params}, batch["input_values"], batch["attention_mask"],
                       deterministic=deterministic, rngs=rngs, **masks)


@flax.struct.dataclass
class ClassificationObjective:
    """(loss_sum, utterances, metrics): mean cross-entropy per utterance, accuracy of the argmax."""

    label_key: str = flax.struct.field(pytree_node=False, default="language_id")

    def __call__(self, model, params, batch, step, rng, deterministic=False):
        del step
        logits = forward(model, params, batch, rng, deterministic).logits
        labels = batch[self.label_key]
        per_utt = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        count = jnp.asarray(labels.shape[0], jnp.float32)
        correct = jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        loss_sum = jnp.sum(per_utt)
        return loss_sum, count, {"accuracy": correct / count, "num_utterances": count}
