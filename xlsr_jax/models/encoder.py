"""The transformer encoder: positional conv embedding, attention blocks (post-LN or pre-LN), layer scan."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from xlsr_jax.config import ConfigError, Wav2Vec2Config
from xlsr_jax.models.layers import Dense, LayerNorm, activation, conv1d, gathered, logical

# The fused attention kernels' forward residuals (their output and softmax statistics) carry this name, so
# that a policy which keeps the projections keeps them too instead of running the kernel's forward again.
FUSED_ATTENTION_RESIDUALS = "fused_attention_residuals"
_policies = jax.checkpoint_policies
_REMAT_POLICIES = {
    "full": _policies.nothing_saveable,
    "dots": _policies.save_from_both_policies(_policies.checkpoint_dots,
                                              _policies.save_only_these_names(FUSED_ATTENTION_RESIDUALS)),
    "dots_no_batch": _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable,
                                                       _policies.save_only_these_names(FUSED_ATTENTION_RESIDUALS)),
}


# On a CPU the positional conv's weight gradient is computed this many kernel taps at a time.
POS_CONV_WEIGHT_GRAD_TAPS = 8


def _group_convs(x: jax.Array, weight: jax.Array, groups: int, padding: int) -> jax.Array:
    cin, cout = x.shape[-1] // groups, weight.shape[-1] // groups
    return jnp.concatenate(
        [
            conv1d(x[..., i * cin : (i + 1) * cin], weight[..., i * cout : (i + 1) * cout],
                   padding=[(padding, padding)])
            for i in range(groups)
        ],
        axis=-1,
    )  # fmt: skip


def tap_weight_grad(x: jax.Array, dy: jax.Array, kernel: int, groups: int, padding: int) -> jax.Array:
    """The gradient [kernel, C / groups, C] of a grouped time conv's weight, given its input x [B, T, C] and the
    gradient dy [B, T', C] of its output: for each tap k, the sum over batch and time of x shifted by k times dy,
    per group. A scan over `POS_CONV_WEIGHT_GRAD_TAPS` taps at a time, each step one batched matmul per row;
    the rows are summed after the scan, so that a batch split across devices adds one all-reduce, not one
    per scan step."""
    batch, _, channels = x.shape
    frames, per_group, taps = dy.shape[1], channels // groups, POS_CONV_WEIGHT_GRAD_TAPS
    steps = -(-kernel // taps)
    padded = jnp.pad(x, ((0, 0), (padding, padding + steps * taps - kernel), (0, 0)))
    padded = padded.reshape(batch, -1, groups, per_group)
    dy = dy.reshape(batch, frames, groups, per_group)

    def step(_, first):
        index = jnp.arange(frames)[:, None] + first + jnp.arange(taps)[None, :]
        shifted = jnp.take(padded, index, axis=1, mode="clip")  # [B, T', taps, groups, C / groups]
        return None, jnp.einsum("btkgc,btgd->bkcgd", shifted, dy, preferred_element_type=jnp.float32)

    _, grad = jax.lax.scan(step, None, jnp.arange(steps) * taps)  # [steps, B, taps, C / groups, groups, C / groups]
    return grad.sum(axis=1).reshape(steps * taps, per_group, channels)[:kernel]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _group_convs_tap_weight_grad(x: jax.Array, weight: jax.Array, groups: int, padding: int) -> jax.Array:
    return _group_convs(x, weight, groups, padding)


def _group_convs_forward(x, weight, groups, padding):
    return _group_convs(x, weight, groups, padding), (x, weight)


def _group_convs_backward(groups, padding, residuals, dy):
    x, weight = residuals
    _, input_grad = jax.vjp(lambda x: _group_convs(x, weight, groups, padding), x)
    weight_grad = tap_weight_grad(x, dy, weight.shape[0], groups, padding)
    return input_grad(dy)[0], weight_grad.astype(weight.dtype)


_group_convs_tap_weight_grad.defvjp(_group_convs_forward, _group_convs_backward)


def grouped_time_conv(x: jax.Array, weight: jax.Array, groups: int, padding: int, platform: str) -> jax.Array:
    """x [B, T, C] convolved over time with weight [K, C / groups, C] in `groups` groups, `padding` frames of
    zeros on each side, as one ungrouped conv per group.

    Not `feature_group_count`: under SPMD with a batch-sharded input and a replicated mesh axis, XLA (jax
    0.10.2) multiplies the grouped conv's weight gradient by that axis' size (caught by
    test_sharded_forward_and_gradients_match_single_device). On a CPU, XLA computes each group's weight
    gradient as a convolution whose window is the whole time axis, which took a third of the base model's
    train step; there the weight gradient is `tap_weight_grad`'s matmuls instead (BENCHMARKS.md).
    """
    if platform == "cpu":
        return _group_convs_tap_weight_grad(x, weight, groups, padding)
    return _group_convs(x, weight, groups, padding)


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
        x = x.astype(dtype)
        weight = gathered(weight.astype(dtype))
        y = grouped_time_conv(x, weight, groups, k // 2, target_platform())
        if k % 2 == 0:  # "same" padding with an even kernel yields one extra frame: drop it
            y = y[:, :-1]
        return activation(cfg.feat_extract_activation, cfg.norm_act_remat)(y + bias.astype(dtype))


CUDNN_FRAME_MULTIPLE = 8  # frames padded to this for cuDNN attention
# Splash attention's tiles: frames are padded to a multiple of the smallest, and the largest of these that
# divides the padded length is the tile (749 frames, 15 s: 768 in tiles of 256; 999 frames: 1024 in 512).
SPLASH_BLOCKS = (512, 256, 128)


def target_platform() -> str:
    """The platform a step being traced will run on: the ambient mesh's devices' ("tpu" when `fit` compiles
    for a TPU pod on a CPU machine), else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def attention_kernel(config: Wav2Vec2Config, deterministic: bool, platform: str | None = None) -> str:
    """"xla", "cudnn" or "splash": what `config.attention_impl` means on `platform` (default: the target
    platform, `target_platform()`) for this call.

    "auto" takes cuDNN's flash attention on a GPU when the compute dtype is bfloat16 and the head size
    fits it (<= 128, a multiple of 8), Pallas' splash attention on a TPU, either only when no attention
    dropout is drawn; everything else, CPU included, materializes the scores with XLA.
    """
    impl = config.attention_impl
    if impl != "auto":
        return impl
    if not (deterministic or config.attention_dropout == 0.0):
        return "xla"
    platform = platform or target_platform()
    if platform == "tpu":
        return "splash"
    fits = config.dtype == "bfloat16" and config.head_dim <= 128 and config.head_dim % 8 == 0
    return "cudnn" if fits and platform == "gpu" else "xla"


def with_named_residuals(fn, name: str):
    """`fn(*arrays) -> array`, differentiated by its own VJP, with its output and every forward residual that
    is not one of its inputs named `name` (`checkpoint_name`): a remat policy that saves the name keeps
    them, and the backward pass does not run `fn`'s forward again. The inputs are left to the policy (the
    caller's projections are saved or recomputed as it says). Integer inputs get no cotangent."""

    @jax.custom_vjp
    def call(*args):
        return fn(*args)

    def forward(*args):
        out, pullback = jax.vjp(fn, *args)
        named_out = checkpoint_name(out, name)
        inputs = {id(a) for a in args}

        def mark(r):
            if r is out:
                return named_out
            return r if id(r) in inputs else checkpoint_name(r, name)

        return named_out, jax.tree.map(mark, pullback)

    def backward(pullback, g):
        return tuple(None if ct.dtype == jax.dtypes.float0 else ct for ct in pullback(g))

    call.defvjp(forward, backward)
    return call


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")


def _mesh_axes_size(mesh, axes) -> int:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """Self-attention of [batch, frames, heads, head_dim] q, k, v over each row's first `lengths` keys, by
    Pallas' TPU splash attention kernel (Pallas' interpreter off a TPU).

    The frames are padded to a multiple of SPLASH_BLOCKS' smallest and the padding is masked as keys
    through the kernel's segment ids (queries: 1, keys: 1 when valid, else 0), so padded queries attend to
    the valid keys as in the XLA path. Under a mesh the kernel runs per shard (`shard_map`) with the batch and
    heads split as the logical rules split "batch" and "act_heads"; a pallas call cannot be partitioned.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    batch, frames, heads, head_dim = q.shape
    padded = -(-frames // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]
    block = next(b for b in SPLASH_BLOCKS if padded % b == 0)
    interpret = target_platform() != "tpu"
    q = q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)
    q, k, v = (jnp.pad(t, ((0, 0), (0, padded - frames), (0, 0), (0, 0))).transpose(0, 2, 1, 3) for t in (q, k, v))
    kv_ids = (jnp.arange(padded)[None, :] < lengths[:, None]).astype(jnp.int32)

    def attend(q, k, v, kv_ids):  # one shard: [b, h, padded, d]
        local_heads = q.shape[1]
        mask = splash_mask.MultiHeadMask([splash_mask.FullMask((padded, padded))] * local_heads)
        sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                        residual_checkpoint_name=FUSED_ATTENTION_RESIDUALS, interpret=interpret)
        ids = splash.SegmentIds(q=jnp.ones_like(kv_ids), kv=kv_ids)
        return jax.vmap(kernel)(q, k, v, segment_ids=ids)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        out = attend(q, k, v, kv_ids)
    else:
        batch_axes, _, heads_axes, _ = nn.logical_to_mesh_axes(("batch", None, "act_heads", None))
        batch_axes = batch_axes if batch % _mesh_axes_size(mesh, batch_axes) == 0 else None
        heads_axes = heads_axes if heads % _mesh_axes_size(mesh, heads_axes) == 0 else None
        spec = jax.sharding.PartitionSpec(batch_axes, heads_axes)
        out = jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(batch_axes)),
                            out_specs=spec, check_vma=False)(q, k, v, kv_ids)
    return out.transpose(0, 2, 1, 3)[:, :frames]


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
        if kernel != "xla":  # the fused kernels take the padding as key lengths
            if not self.deterministic and cfg.attention_dropout:
                raise ConfigError(f"attention_impl={kernel!r} has no attention dropout; "
                                  "use 'xla' or attention_dropout=0")
            if lengths is None:
                lengths = jnp.full((x.shape[0],), x.shape[1], jnp.int32)
        if kernel == "splash":
            if target_platform() == "gpu":  # Pallas' interpreter is for tests on a CPU
                raise ConfigError("attention_impl='splash' is a TPU kernel; on a GPU use 'cudnn' or 'auto'")
            out = splash_attention(q, k, v, lengths)
        elif kernel == "cudnn":
            # jax's cuDNN path rejects odd lengths when training: pad the frames, mask them as keys, drop them.
            frames = x.shape[1]
            pad = -frames % CUDNN_FRAME_MULTIPLE
            q, k, v = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (q, k, v))
            # jax's cuDNN call names no residuals: named here, `dots` keeps them as it keeps splash's.
            out = with_named_residuals(_cudnn_attention, FUSED_ATTENTION_RESIDUALS)(q, k, v, lengths)[:, :frames]
        else:
            scores = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) / math.sqrt(head_dim)
            if lengths is not None:
                valid = jnp.arange(k.shape[1]) < lengths[:, None]
                scores = scores + jnp.where(valid, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
            # This softmax's derivative keeps only its output (JAX's default one keeps the exponentials too).
            with jax.softmax_custom_jvp(True):
                probs = jax.nn.softmax(scores, axis=-1)
            probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=self.deterministic)
            out = jnp.einsum("bnts,bsnd->btnd", probs.astype(dtype), v)
        return Dense(cfg.hidden_size, ("heads", "kv", "embed"), in_axes=2, dtype=dtype, name="out_proj")(out)


def layer_norm_act_remat(cfg: Wav2Vec2Config) -> bool:
    """`norm_act_remat` inside a transformer layer: only where the layer itself is not rematerialized (a
    rematerialized layer recomputes its norms and activations already; nested, they would run a third time)."""
    return cfg.norm_act_remat and cfg.remat_policy == "none"


class FeedForward(nn.Module):
    config: Wav2Vec2Config
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=dtype, name="intermediate_dense")(x)
        h = nn.with_logical_constraint(h, ("batch", "frames", "act_mlp"))
        h = activation(cfg.hidden_act, layer_norm_act_remat(cfg))(h)
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
        recompute = layer_norm_act_remat(cfg)
        layer_norm = LayerNorm("embed", cfg.layer_norm_eps, dtype, recompute=recompute, name="layer_norm")
        final_layer_norm = LayerNorm("embed", cfg.layer_norm_eps, dtype, recompute=recompute,
                                     name="final_layer_norm")
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
            x = LayerNorm("embed", cfg.layer_norm_eps, dtype, recompute=cfg.norm_act_remat,
                          name="layer_norm")(x)
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
            x = LayerNorm("embed", cfg.layer_norm_eps, dtype, recompute=cfg.norm_act_remat,
                          name="layer_norm")(x)
        return x, hidden_states
