"""The convolutional feature encoder (raw audio -> 50 Hz frames) and the feature projection."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from xlsr_jax.config import Wav2Vec2Config
from xlsr_jax.models.layers import Dense, LayerNorm, activation, conv1d, gathered, logical, torch_linear_uniform

CONV_OUTPUT = "conv_output"  # the name under which `conv_remat` keeps each conv's output


def frame_mask(config: Wav2Vec2Config, attention_mask: jax.Array, num_frames: int) -> jax.Array:
    """Boolean [B, frames] mask of real frames, from a [B, samples] mask of real samples (HF semantics)."""
    lengths = config.num_frames(attention_mask.astype(jnp.int32).sum(-1))
    return jnp.arange(num_frames)[None, :] < lengths[:, None]


class ConvLayer(nn.Module):
    """One conv block: Conv1d, then LayerNorm ("layer"), GroupNorm (layer 0 of "group") or nothing."""

    config: Wav2Vec2Config
    layer_id: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        in_dim = x.shape[-1]
        out_dim = cfg.conv_dim[self.layer_id]
        k = cfg.conv_kernel[self.layer_id]
        # PyTorch kaiming_normal_ (fan_in, gain sqrt(2)) as Hugging Face initializes Conv1d.
        kernel = self.param(
            "kernel",
            logical(nn.initializers.variance_scaling(2.0, "fan_in", "normal"), ("conv_kernel", "conv_in", "conv_out")),
            (k, in_dim, out_dim),
        )
        x = conv1d(x.astype(dtype), gathered(kernel.astype(dtype)), stride=cfg.conv_stride[self.layer_id])
        if cfg.conv_bias:
            bias = self.param("bias", logical(torch_linear_uniform(in_dim * k), ("conv_out",)), (out_dim,))
            x = x + bias.astype(dtype)
        x = checkpoint_name(x, CONV_OUTPUT)
        recompute = cfg.norm_act_remat and not cfg.conv_remat  # conv_remat recomputes the norm and GELU already
        if cfg.feat_extract_norm == "layer":
            # PyTorch's LayerNorm default eps here, not config.layer_norm_eps (as in Hugging Face).
            x = LayerNorm("conv_out", epsilon=1e-5, dtype=dtype, recompute=recompute, name="layer_norm")(x)
        elif self.layer_id == 0:
            x = LayerNorm("conv_out", epsilon=1e-5, dtype=dtype, reduce_axis=-2, recompute=recompute,
                          name="layer_norm")(x)
        return activation(cfg.feat_extract_activation, recompute)(x)


class FeatureEncoder(nn.Module):
    """Raw audio [B, samples] -> conv features [B, frames, conv_dim[-1]].

    With `config.conv_remat` each conv layer is rematerialized: its backward pass keeps the layer's input
    and its conv output and recomputes the norm and activation from them (elementwise work). The
    parameters keep their names and shapes.
    """

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, input_values: jax.Array) -> jax.Array:
        layer = ConvLayer
        if self.config.conv_remat:
            layer = nn.remat(ConvLayer, policy=jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT))
        x = input_values[..., None]
        for i in range(self.config.num_feat_extract_layers):
            x = layer(self.config, i, name=f"conv_layers_{i}")(x)
            x = nn.with_logical_constraint(x, ("batch", "frames", "act_conv"))
        return x


class FeatureProjection(nn.Module):
    """LayerNorm then Linear into the transformer width; returns (projected, normalized features)."""

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, features: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        norm = LayerNorm("conv_out", epsilon=cfg.layer_norm_eps, dtype=dtype, recompute=cfg.norm_act_remat,
                         name="layer_norm")(features)
        init = torch_linear_uniform(features.shape[-1])
        hidden = Dense(
            cfg.hidden_size, ("conv_out", "embed"), dtype=dtype, kernel_init=init, bias_init=init, name="projection"
        )(norm)
        hidden = nn.Dropout(cfg.feat_proj_dropout)(hidden, deterministic=deterministic)
        return hidden, norm
