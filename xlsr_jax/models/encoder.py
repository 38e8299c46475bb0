"""The transformer encoder: positional conv embedding, attention blocks (post-LN or pre-LN), layer scan."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlsr_jax.config import ConfigError, Wav2Vec2Config
from xlsr_jax.models.layers import Dense, LayerNorm, activation, conv1d, gathered, logical

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class PositionalConvEmbedding(nn.Module):
    """Grouped conv over time with weight norm over the kernel axis (PyTorch weight_norm, dim=2)."""

    config: Wav2Vec2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        k, groups, hidden = cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups, cfg.hidden_size
        std = 2.0 * math.sqrt(1.0 / (k * hidden))
        # v is stored [kernel, in/groups, out] (Flax conv layout); g has one entry per kernel tap.
        v = self.param(
            "weight_v", logical(nn.initializers.normal(std), ("conv_kernel", None, "embed")), (k, hidden // groups, hidden)
        )
        g = self.param(
            "weight_g", logical(lambda *_: jnp.sqrt(jnp.sum(v * v, axis=(1, 2))), ("conv_kernel",)), (k,)
        )
        bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)), (hidden,))
        weight = v * (g / jnp.sqrt(jnp.sum(v * v, axis=(1, 2))))[:, None, None]
        # One ungrouped conv per group instead of feature_group_count: under SPMD with a batch-sharded
        # input and a replicated mesh axis, XLA (jax 0.10.2) multiplies the grouped conv's weight
        # gradient by that axis' size (caught by test_sharded_forward_and_gradients_match_single_device).
        x = x.astype(dtype)
        weight = gathered(weight.astype(dtype))
        cin, cout = hidden // groups, hidden // groups
        y = jnp.concatenate(
            [
                conv1d(x[..., i * cin : (i + 1) * cin], weight[..., i * cout : (i + 1) * cout],
                       padding=[(k // 2, k // 2)])
                for i in range(groups)
            ],
            axis=-1,
        )  # fmt: skip
        if k % 2 == 0:  # "same" padding with an even kernel yields one extra frame: drop it
            y = y[:, :-1]
        return activation(cfg.feat_extract_activation)(y + bias.astype(dtype))


CUDNN_FRAME_MULTIPLE = 8  # frames padded to this for cuDNN attention


def attention_kernel(config: Wav2Vec2Config, deterministic: bool) -> str:
    """"xla" or "cudnn": what `config.attention_impl` means on this backend for this call.

    "auto" takes cuDNN's flash attention on a GPU when the compute dtype is bfloat16, the head size
    fits it (<= 128, a multiple of 8) and no attention dropout is drawn; everything else, TPU and CPU
    included, materializes the scores with XLA.
    """
    impl = config.attention_impl
    if impl != "auto":
        return impl
    fits = config.dtype == "bfloat16" and config.head_dim <= 128 and config.head_dim % 8 == 0
    no_dropout = deterministic or config.attention_dropout == 0.0
    return "cudnn" if fits and no_dropout and jax.default_backend() == "gpu" else "xla"


class Attention(nn.Module):
    """Multi-head self-attention over frames whose valid part is a prefix of `lengths` frames per row
    (None: all valid)."""

    config: Wav2Vec2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        def proj(name):
            return Dense((heads, head_dim), ("embed", "heads", "kv"), dtype=dtype, name=name)(x)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        q = nn.with_logical_constraint(q, ("batch", "frames", "act_heads", None))
        kernel = attention_kernel(cfg, self.deterministic)
        if kernel == "cudnn":
            if not self.deterministic and cfg.attention_dropout:
                raise ConfigError("attention_impl='cudnn' has no attention dropout; use 'xla' or attention_dropout=0")
            # jax's cuDNN path rejects odd lengths when training: pad the frames, mask them as keys, drop them.
            frames = x.shape[1]
            pad = -frames % CUDNN_FRAME_MULTIPLE
            if lengths is None:
                lengths = jnp.full((x.shape[0],), frames, jnp.int32)
            q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
            out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
            out = out[:, :frames]
        else:
            scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
            if lengths is not None:
                valid = jnp.arange(k.shape[1]) < lengths[:, None]
                scores = scores + jnp.where(valid, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
            probs = jax.nn.softmax(scores, axis=-1)
            probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=self.deterministic)
            out = jnp.einsum("bnts,bsnd->btnd", probs.astype(dtype), v)
        return Dense(cfg.hidden_size, ("heads", "kv", "embed"), in_axes=2, dtype=dtype, name="out_proj")(out)


class FeedForward(nn.Module):
    config: Wav2Vec2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=dtype, name="intermediate_dense")(x)
        h = nn.with_logical_constraint(h, ("batch", "frames", "act_mlp"))
        h = activation(cfg.hidden_act)(h)
        h = nn.Dropout(cfg.activation_dropout)(h, deterministic=self.deterministic)
        h = Dense(cfg.hidden_size, ("mlp", "embed"), dtype=dtype, name="output_dense")(h)
        return nn.Dropout(cfg.hidden_dropout)(h, deterministic=self.deterministic)


class EncoderLayer(nn.Module):
    """One transformer block; pre-LN when `do_stable_layer_norm` (XLS-R), post-LN otherwise (base).

    Called as a scan body: (hidden, lengths) -> (hidden, layer input or None). The layer input is
    emitted so that `hidden_states` can be collected without unrolling the scan.
    """

    config: Wav2Vec2Config
    deterministic: bool = True
    emit_input: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        det = self.deterministic
        inputs = x
        attention = Attention(cfg, det, name="attention")
        feed_forward = FeedForward(cfg, det, name="feed_forward")
        layer_norm = LayerNorm("embed", cfg.layer_norm_eps, dtype, name="layer_norm")
        final_layer_norm = LayerNorm("embed", cfg.layer_norm_eps, dtype, name="final_layer_norm")
        dropout = nn.Dropout(cfg.hidden_dropout)
        if cfg.do_stable_layer_norm:
            x = x + dropout(attention(layer_norm(x), lengths), deterministic=det)
            x = x + feed_forward(final_layer_norm(x))
        else:
            x = layer_norm(x + dropout(attention(x, lengths), deterministic=det))
            x = final_layer_norm(x + feed_forward(x))
        if not det and cfg.layerdrop > 0.0:
            # LayerDrop: the whole batch skips this layer with probability `layerdrop`. The layer is
            # still computed (a data-dependent branch inside the scan would serialize it on TPU).
            skip = jax.random.uniform(self.make_rng("dropout")) < cfg.layerdrop
            x = jnp.where(skip, inputs, x)
        x = nn.with_logical_constraint(x, ("batch", "frames", "act_embed"))
        return x, (inputs if self.emit_input else None)


class Encoder(nn.Module):
    """Positional embedding + the layer stack. Returns (last hidden state, hidden_states or None).

    hidden_states follows Hugging Face transformers 5: entry i is the input of layer i, the last
    entry is the output of the last layer (before the final LayerNorm in the pre-LN variant).
    """

    config: Wav2Vec2Config

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        lengths = None
        if mask is not None:  # a prefix of real frames per row (`frame_mask`)
            x = jnp.where(mask[..., None], x, 0)  # padded frames must not leak into the positional conv
            lengths = mask.sum(-1, dtype=jnp.int32)
        x = x + PositionalConvEmbedding(cfg, name="pos_conv_embed")(x)
        if not cfg.do_stable_layer_norm:
            x = LayerNorm("embed", cfg.layer_norm_eps, dtype, name="layer_norm")(x)
        x = nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x.astype(dtype), ("batch", "frames", "act_embed"))

        block = EncoderLayer
        if cfg.remat_policy != "none":
            block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, deterministic, output_hidden_states, name="layers")
            x, inputs = stack(x, lengths)
            hidden_states = list(inputs) if output_hidden_states else None
        else:
            hidden_states = [] if output_hidden_states else None
            for i in range(cfg.num_hidden_layers):
                x, inp = block(cfg, deterministic, output_hidden_states, name=f"layers_{i}")(x, lengths)
                if output_hidden_states:
                    hidden_states.append(inp)
        if output_hidden_states:
            hidden_states.append(x)
        if cfg.do_stable_layer_norm:
            x = LayerNorm("embed", cfg.layer_norm_eps, dtype, name="layer_norm")(x)
        return x, hidden_states
