"""Task heads on the shared encoder; each keeps the encoder under `wav2vec2` as Hugging Face does.

Heads are plain modules chosen from `HEAD_MODULES` by name, so a new task is a new class here
and an entry in that dict; the encoder, converters and trainers do not change.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from xlsr_jax.config import HEADS, ConfigError, Wav2Vec2Config
from xlsr_jax.models.layers import Dense, logical, torch_linear_uniform
from xlsr_jax.models.quantizer import GumbelVectorQuantizer, QuantizerOutput
from xlsr_jax.models.wav2vec2 import Wav2Vec2Model, Wav2Vec2Output


class Wav2Vec2Encoder(nn.Module):
    """The bare encoder as a head: returns `Wav2Vec2Output` (HF `Wav2Vec2Model`)."""

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, input_values, attention_mask=None, deterministic=True, output_hidden_states=False,
                 **masks) -> Wav2Vec2Output:
        return Wav2Vec2Model(self.config, name="wav2vec2")(
            input_values, attention_mask, deterministic=deterministic,
            output_hidden_states=output_hidden_states, **masks,
        )  # fmt: skip


@flax.struct.dataclass
class CTCOutput:
    logits: jax.Array  # [B, T, vocab] float32
    encoder: Wav2Vec2Output


class Wav2Vec2ForCTC(nn.Module):
    """CTC head: dropout then `lm_head` over every frame (HF `Wav2Vec2ForCTC`)."""

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, input_values, attention_mask=None, deterministic=True, output_hidden_states=False,
                 **masks) -> CTCOutput:
        cfg = self.config
        out = Wav2Vec2Model(cfg, name="wav2vec2")(
            input_values, attention_mask, deterministic=deterministic,
            output_hidden_states=output_hidden_states, **masks,
        )  # fmt: skip
        hidden = nn.Dropout(cfg.final_dropout)(out.last_hidden_state, deterministic=deterministic)
        logits = Dense(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.dtype(cfg.dtype), name="lm_head")(hidden)
        return CTCOutput(logits=logits.astype(jnp.float32), encoder=out)


@flax.struct.dataclass
class ClassificationOutput:
    logits: jax.Array  # [B, num_labels] float32
    encoder: Wav2Vec2Output


class Wav2Vec2ForSequenceClassification(nn.Module):
    """Utterance classification (e.g. language ID): projector, mean-pool over real frames, classifier."""

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, input_values, attention_mask=None, deterministic=True, output_hidden_states=False,
                 **masks) -> ClassificationOutput:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        out = Wav2Vec2Model(cfg, name="wav2vec2")(
            input_values, attention_mask, deterministic=deterministic,
            output_hidden_states=output_hidden_states or cfg.use_weighted_layer_sum, **masks,
        )  # fmt: skip
        if cfg.use_weighted_layer_sum:
            num = cfg.num_hidden_layers + 1
            weights = self.param("layer_weights", logical(nn.initializers.constant(1.0 / num), (None,)), (num,))
            stacked = jnp.stack(out.hidden_states, axis=0).astype(jnp.float32)
            hidden = jnp.einsum("l,l...->...", jax.nn.softmax(weights), stacked).astype(dtype)
        else:
            hidden = out.last_hidden_state
        hidden = Dense(cfg.classifier_proj_size, ("embed", "classifier"), dtype=dtype, name="projector")(hidden)
        hidden = hidden.astype(jnp.float32)
        if out.frame_mask is None:
            pooled = hidden.mean(axis=1)
        else:
            m = out.frame_mask[..., None].astype(jnp.float32)
            pooled = (hidden * m).sum(axis=1) / m.sum(axis=1)
        logits = Dense(cfg.num_labels, ("classifier", "labels"), dtype=dtype, name="classifier")(pooled)
        return ClassificationOutput(logits=logits.astype(jnp.float32), encoder=out)


@flax.struct.dataclass
class PreTrainingOutput:
    projected_states: jax.Array  # [B, T, proj_codevector_dim]: transformer output, projected
    projected_quantized_states: jax.Array  # [B, T, proj_codevector_dim]: quantized targets, projected
    quantizer: QuantizerOutput
    encoder: Wav2Vec2Output


class Wav2Vec2ForPreTraining(nn.Module):
    """The contrastive pretraining head's modules: quantizer, project_q, project_hid.

    Masks and negatives are inputs (made in the data pipeline); the loss lives in the objective.
    """

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, input_values, attention_mask=None, deterministic=True, output_hidden_states=False,
                 mask_time_indices=None, temperature=2.0, **masks) -> PreTrainingOutput:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        out = Wav2Vec2Model(cfg, name="wav2vec2")(
            input_values, attention_mask, mask_time_indices=mask_time_indices, deterministic=deterministic,
            output_hidden_states=output_hidden_states, **masks,
        )  # fmt: skip
        hid_init = torch_linear_uniform(cfg.hidden_size)
        projected = Dense(
            cfg.proj_codevector_dim, ("embed", "proj"), dtype=dtype, kernel_init=hid_init, bias_init=hid_init,
            name="project_hid",
        )(out.last_hidden_state)
        features = nn.Dropout(cfg.feat_quantizer_dropout)(out.extract_features, deterministic=deterministic)
        quantized = GumbelVectorQuantizer(cfg, name="quantizer")(features, temperature, deterministic)
        q_init = torch_linear_uniform(cfg.codevector_dim)
        projected_q = Dense(
            cfg.proj_codevector_dim, ("codevector", "proj"), dtype=dtype, kernel_init=q_init, bias_init=q_init,
            name="project_q",
        )(quantized.codevectors)
        return PreTrainingOutput(
            projected_states=projected.astype(jnp.float32),
            projected_quantized_states=projected_q.astype(jnp.float32),
            quantizer=quantized,
            encoder=out,
        )


HEAD_MODULES: dict[str, type[nn.Module]] = {
    "base": Wav2Vec2Encoder,
    "ctc": Wav2Vec2ForCTC,
    "sequence_classification": Wav2Vec2ForSequenceClassification,
    "pretraining": Wav2Vec2ForPreTraining,
}
assert set(HEAD_MODULES) == set(HEADS)


def build_model(config: Wav2Vec2Config, head: str = "base") -> nn.Module:
    """The Flax module for `head` ("base", "ctc", "sequence_classification", "pretraining")."""
    if head not in HEAD_MODULES:
        raise ConfigError(f"unknown head {head!r}; choose one of {sorted(HEAD_MODULES)}")
    return HEAD_MODULES[head](config)


def abstract_params(config: Wav2Vec2Config, head: str = "base", num_samples: int = 16000):
    """Parameter shapes (boxed with logical names) without allocating anything (`jax.eval_shape`)."""
    model = build_model(config, head)
    audio = jax.ShapeDtypeStruct((1, num_samples), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), audio)
    return variables["params"]


def init_params(config: Wav2Vec2Config, head: str = "base", seed: int = 0, num_samples: int = 16000):
    """Randomly initialized, unboxed float32 parameters (small models: tests, smoke runs, demos)."""
    model = build_model(config, head)
    audio = jnp.zeros((1, num_samples), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(seed), audio)
    return nn.meta.unbox(variables["params"])


def count_params(params) -> int:
    """Total number of parameters in a (possibly abstract, possibly boxed) tree."""
    leaves = jax.tree_util.tree_leaves(nn.meta.unbox(params))
    return int(sum(x.size for x in leaves))
