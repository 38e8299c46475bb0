"""Gumbel-softmax product quantizer (G groups x V codewords) of the pretraining head."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from xlsr_jax.config import Wav2Vec2Config
from xlsr_jax.models.layers import Dense, logical


@flax.struct.dataclass
class QuantizerOutput:
    codevectors: jax.Array  # [B, T, codevector_dim]
    logits: jax.Array  # [B, T, G, V] float32, before Gumbel noise
    codes: jax.Array  # [B, T, G] int32: the chosen codeword per group


def gumbel_noise(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard Gumbel noise in float32 (a module-level function so parity tests can inject noise)."""
    return jax.random.gumbel(key, shape, jnp.float32)


class GumbelVectorQuantizer(nn.Module):
    """Projects features to G*V logits and picks one codeword per group.

    Training (`deterministic=False`): hard straight-through Gumbel-softmax at `temperature`, with the
    softmax in float32 (bf16 softmax over 320 entries is one source of codebook collapse).
    Evaluation: argmax codes. Perplexities and losses live in the pretraining objective.
    """

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, features: jax.Array, temperature: float | jax.Array = 2.0, deterministic: bool = True):
        cfg = self.config
        groups, entries = cfg.num_codevector_groups, cfg.num_codevectors_per_group
        codevectors = self.param(
            "codevectors",
            logical(nn.initializers.uniform(1.0), ("codevectors", None)),
            (groups * entries, cfg.codevector_dim // groups),
        )
        logits = Dense(
            groups * entries, ("conv_out", "codevectors"), dtype=jnp.dtype(cfg.dtype),
            kernel_init=nn.initializers.normal(1.0), name="weight_proj",
        )(features)
        logits = logits.astype(jnp.float32).reshape(*features.shape[:-1], groups, entries)
        if deterministic:
            codes = jnp.argmax(logits, axis=-1)
            one_hot = jax.nn.one_hot(codes, entries, dtype=jnp.float32)
        else:
            gumbel = gumbel_noise(self.make_rng("gumbel"), logits.shape)
            soft = jax.nn.softmax((logits + gumbel) / temperature, axis=-1)
            codes = jnp.argmax(soft, axis=-1)
            hard = jax.nn.one_hot(codes, entries, dtype=jnp.float32)
            one_hot = hard + soft - jax.lax.stop_gradient(soft)  # straight-through estimator
        book = codevectors.reshape(groups, entries, -1)
        selected = jnp.einsum("...gv,gvd->...gd", one_hot, book)
        selected = selected.reshape(*features.shape[:-1], -1)
        return QuantizerOutput(codevectors=selected, logits=logits, codes=codes.astype(jnp.int32))
