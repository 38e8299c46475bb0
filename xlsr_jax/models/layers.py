"""Building blocks with logical axis names on every parameter.

Hugging Face / PyTorch initializers are reproduced where they matter for training from scratch
(the quantizer, the positional conv, the feature projection); converted checkpoints overwrite them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Axes = tuple[str | None, ...]


def logical(init: Callable, names: Axes) -> Callable:
    """Attach logical axis names to an initializer (names index the parameter's dimensions)."""
    return nn.with_logical_partitioning(init, names)


def gathered(weight: jax.Array) -> jax.Array:
    """The weight whole on every device for its use here: one all-gather per use (parameters stay sharded).

    For convolution kernels: XLA partitions a conv whose kernel is sharded on its output channels by
    rotating the shards around the ring one kernel tap at a time (hundreds of tiny collective-permutes
    per step on a 128-tap positional conv). A no-op outside `sharding_context`.
    """
    return nn.with_logical_constraint(weight, (None,) * weight.ndim)


def torch_linear_uniform(fan_in: int) -> Callable:
    """PyTorch nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def activation(name: str, recompute: bool = False) -> Callable[[jax.Array], jax.Array]:
    """Hugging Face ACT2FN semantics: "gelu" is the exact (erf) GELU.

    With `recompute` the backward pass keeps only the activation's input and recomputes the rest from it.
    """
    fn = {
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
        "relu": jax.nn.relu,
        "swish": jax.nn.silu,
        "silu": jax.nn.silu,
    }[name]
    return jax.checkpoint(fn) if recompute else fn


class Dense(nn.Module):
    """A linear layer over the last axis whose output may be split into several named axes.

    `features` may be an int or a tuple (e.g. (heads, head_dim)); `in_axes` > 1 contracts several
    trailing input axes (e.g. the attention output projection). Kernels are [in..., out...].
    """

    features: int | tuple[int, ...]
    kernel_axes: Axes
    bias_axes: Axes | None = None
    in_axes: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[-self.in_axes :]
        kernel = self.param("kernel", logical(self.kernel_init, self.kernel_axes), (*in_shape, *features))
        contract = tuple(range(x.ndim - self.in_axes, x.ndim))
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            ((contract, tuple(range(self.in_axes))), ((), ())),
        )
        if self.use_bias:
            bias_axes = self.bias_axes if self.bias_axes is not None else self.kernel_axes[self.in_axes :]
            bias = self.param("bias", logical(self.bias_init, bias_axes), features)
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """Normalization over `reduce_axis` with a per-channel affine; statistics in float32.

    PyTorch semantics (biased variance). `reduce_axis=-1` is LayerNorm; `reduce_axis=-2` on [B, T, C]
    is GroupNorm with one group per channel (each channel normalized over time, wav2vec 2.0 base).
    With `recompute` the backward pass keeps only the input and recomputes the statistics from it.
    """

    axis_name: str | None
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    reduce_axis: int = -1
    recompute: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", logical(nn.initializers.ones, (self.axis_name,)), (features,))
        bias = self.param("bias", logical(nn.initializers.zeros, (self.axis_name,)), (features,))

        def normalize(x, scale, bias):
            x32 = x.astype(jnp.float32)
            mean = x32.mean(self.reduce_axis, keepdims=True)
            var = jnp.square(x32 - mean).mean(self.reduce_axis, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
            return y.astype(self.dtype)

        if not self.recompute:
            return normalize(x, scale, bias)
        # Whole on every device before the checkpoint, which then keeps them: the backward pass does not
        # gather them again to recompute.
        return jax.checkpoint(normalize)(x, gathered(scale), gathered(bias))


def conv1d(
    x: jax.Array, kernel: jax.Array, stride: int = 1, padding: Sequence[tuple[int, int]] | str = "VALID",
    groups: int = 1,
) -> jax.Array:
    """1-D convolution of x [B, T, C_in] with kernel [K, C_in / groups, C_out] (PyTorch cross-correlation)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride,),
        padding=padding,
        dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=groups,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
    """Identity forward; multiplies the gradient by `scale` (fairseq's GradMultiply)."""
    return x


def _scale_gradient_fwd(x, scale):
    return x, None


def _scale_gradient_bwd(scale, _, g):
    return (g * scale,)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)
