"""The bare wav2vec 2.0 / XLS-R encoder: audio -> frames -> contextual representations."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from xlsr_jax.config import ConfigError, Wav2Vec2Config
from xlsr_jax.models.encoder import Encoder
from xlsr_jax.models.feature_encoder import FeatureEncoder, FeatureProjection, frame_mask
from xlsr_jax.models.layers import logical, scale_gradient


@flax.struct.dataclass
class Wav2Vec2Output:
    last_hidden_state: jax.Array  # [B, T, hidden]
    extract_features: jax.Array  # [B, T, conv_dim[-1]]: LayerNorm-ed conv features (quantizer input)
    frame_mask: jax.Array | None  # [B, T] bool, True on real frames; None when no padding mask given
    hidden_states: tuple[jax.Array, ...] | None = None  # num_hidden_layers + 1 entries, HF order
    conv_features: jax.Array | None = None  # raw conv output (for fairseq's feature penalty)


class Wav2Vec2Model(nn.Module):
    """Hugging Face `Wav2Vec2Model` equivalent.

    Args to __call__:
      input_values: [B, samples] float audio.
      attention_mask: [B, samples], 1 on real samples (None: no padding).
      mask_time_indices: [B, frames] bool; those frames are replaced by `masked_spec_embed`.
      mask_feature_indices: [B, hidden] bool; those channels are zeroed on every frame.
    """

    config: Wav2Vec2Config

    @nn.compact
    def __call__(
        self,
        input_values: jax.Array,
        attention_mask: jax.Array | None = None,
        mask_time_indices: jax.Array | None = None,
        mask_feature_indices: jax.Array | None = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> Wav2Vec2Output:
        cfg = self.config
        input_values = nn.with_logical_constraint(input_values, ("batch", "samples"))
        conv_features = FeatureEncoder(cfg, name="feature_extractor")(input_values)
        if cfg.feature_grad_mult == 0.0:
            conv_features = jax.lax.stop_gradient(conv_features)
        elif cfg.feature_grad_mult != 1.0:
            conv_features = scale_gradient(conv_features, cfg.feature_grad_mult)

        mask = None
        if attention_mask is not None:
            mask = frame_mask(cfg, attention_mask, conv_features.shape[1])

        hidden, extract_features = FeatureProjection(cfg, name="feature_projection")(conv_features, deterministic)

        if cfg.has_masked_spec_embed:
            embed = self.param(
                "masked_spec_embed", logical(nn.initializers.uniform(1.0), ("embed",)), (cfg.hidden_size,)
            )
        if cfg.apply_spec_augment and mask_time_indices is not None:
            if not cfg.has_masked_spec_embed:
                raise ConfigError(
                    "mask_time_indices given but the model has no masked_spec_embed "
                    "(mask_time_prob and mask_feature_prob are both 0 in its config)"
                )
            hidden = jnp.where(mask_time_indices[..., None], embed.astype(hidden.dtype), hidden)
        if cfg.apply_spec_augment and mask_feature_indices is not None:
            hidden = jnp.where(mask_feature_indices[:, None, :], 0, hidden)

        last, hidden_states = Encoder(cfg, name="encoder")(hidden, mask, deterministic, output_hidden_states)
        return Wav2Vec2Output(
            last_hidden_state=last,
            extract_features=extract_features,
            frame_mask=mask,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            conv_features=conv_features,
        )
