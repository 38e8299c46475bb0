"""Model behaviour beyond parity: layouts, dtypes, logical sharding, dropout, gradient scaling, padding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from xlsr_jax.config import get_preset
from xlsr_jax.convert.layout import stack_layers, unstack_layers
from xlsr_jax.models.heads import abstract_params, build_model, init_params
from xlsr_jax.parallel.rules import DEFAULT_RULES, logical_sharding, param_shardings


def _batch(b=2, n=8000, seed=0):
    rng = np.random.RandomState(seed)
    audio = rng.randn(b, n).astype(np.float32)
    mask = np.ones((b, n), np.int32)
    mask[1, n * 2 // 3 :] = 0
    audio[1, n * 2 // 3 :] = 0
    return jnp.asarray(audio), jnp.asarray(mask)


def _ctc_loss_fn(config, audio, mask):
    model = build_model(config, "ctc")

    def loss(params):
        logits = model.apply({"params": params}, audio, mask).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 1] * 3.0 + logits[..., 0] ** 2)

    return loss


def test_every_param_has_logical_names_known_to_the_rules():
    known = {name for name, _ in DEFAULT_RULES}
    for head in ("ctc", "sequence_classification", "pretraining"):
        config = get_preset("tiny", use_weighted_layer_sum=head == "sequence_classification")
        boxed = abstract_params(config, head)
        leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), leaf
            assert len(leaf.names) == leaf.value.ndim
            assert set(leaf.names) - {None} <= known, leaf.names
        specs = nn.get_partition_spec(boxed)
        # scanned layers carry the "layers" axis first
        assert specs["wav2vec2"]["encoder"]["layers"]["attention"]["q_proj"]["kernel"] == \
            jax.sharding.PartitionSpec("layers", "embed", "heads", "kv")


@pytest.fixture(scope="module")
def no_remat():
    """Loss and gradients without rematerialization (computed once for every policy below)."""
    audio, mask = _batch()
    base = get_preset("tiny", hidden_dropout=0.0)
    params = init_params(base, "ctc")
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(_ctc_loss_fn(base, audio, mask)))(params)
    return audio, mask, base, params, ref_loss, ref_grads


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_change_nothing_numerically(policy, no_remat):
    audio, mask, base, params, ref_loss, ref_grads = no_remat
    loss, grads = jax.jit(jax.value_and_grad(_ctc_loss_fn(base.replace(remat_policy=policy), audio, mask)))(params)
    assert abs(float(loss) - float(ref_loss)) < 1e-6
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_conv_remat_keeps_params_and_gradients_and_saves_the_conv_activations(no_remat):
    audio, mask, base, params, ref_loss, ref_grads = no_remat
    config = base.replace(conv_remat=True)
    assert jax.tree_util.tree_structure(init_params(config, "ctc")) == jax.tree_util.tree_structure(params)
    grad_fn = jax.jit(jax.value_and_grad(_ctc_loss_fn(config, audio, mask)))
    loss, grads = grad_fn(params)
    assert abs(float(loss) - float(ref_loss)) < 1e-6
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)
    # What the backward pass keeps: the compiled program's scratch memory at a 4 s crop, where the
    # conv encoder's activations are most of it. Autodiff's own intermediates (norm_act_remat off) show it.
    temps = {remat: _long_crop_temps(base.replace(conv_remat=remat, norm_act_remat=False), params)
             for remat in (False, True)}
    assert temps[False] - temps[True] > _FIRST_CONV, temps


# One float32 [2, frames of conv layer 0, channels] tensor of the "tiny" preset at a 4 s crop.
_FIRST_CONV = 2 * 12799 * get_preset("tiny").conv_dim[0] * 4


def _long_crop_temps(config, params) -> int:
    """The compiled gradient's scratch bytes at 2 x 4 s crops."""
    long_audio, long_mask = jnp.zeros((2, 64000)), jnp.ones((2, 64000), jnp.int32)
    fn = jax.jit(jax.grad(_ctc_loss_fn(config, long_audio, long_mask)))
    return fn.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_norm_act_remat_keeps_gradients_and_keeps_only_the_inputs_of_norms_and_activations(no_remat):
    audio, mask, base, params, ref_loss, ref_grads = no_remat
    assert base.norm_act_remat  # the default
    off = base.replace(norm_act_remat=False)
    loss, grads = jax.jit(jax.value_and_grad(_ctc_loss_fn(off, audio, mask)))(params)
    assert abs(float(loss) - float(ref_loss)) < 1e-6
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)
    # Autodiff keeps the GELU's erfc and exp and the LayerNorm's centred and normalized inputs of each conv
    # layer: at the first conv layer alone, 4 tensors more than the layer's input.
    saved = _long_crop_temps(off, params) - _long_crop_temps(base, params)
    assert saved > 4 * _FIRST_CONV, saved


@pytest.mark.parametrize("policy", ["none", "dots", "full"])
def test_a_layer_gelu_runs_at_most_twice_under_every_remat_policy(policy):
    """Forward, then one recomputation: `norm_act_remat` does not nest inside a rematerialized layer."""
    audio, mask = _batch()
    config = get_preset("tiny", hidden_dropout=0.0, feat_extract_activation="relu", remat_policy=policy)
    lowered = jax.jit(jax.grad(_ctc_loss_fn(config, audio, mask))).lower(init_params(config, "ctc"))
    assert lowered.as_text().count("erf") == 2  # only the feed-forward GELU is exact (erf) here


def test_the_attention_keeps_one_probability_tensor_per_layer(capsys):
    """The softmax's derivative needs only its output; JAX's default derivative keeps the exponentials too."""
    audio, mask = _batch()
    config = get_preset("tiny", scan_layers=False)
    params = init_params(config, "ctc")
    jax.ad_checkpoint.print_saved_residuals(_ctc_loss_fn(config, audio, mask), params)
    frames = config.num_frames(audio.shape[1])
    probs = [line for line in capsys.readouterr().out.splitlines() if f",{frames},{frames}]" in line]
    assert len(probs) == config.num_hidden_layers, probs


def test_scan_and_unrolled_have_the_same_gradients():
    audio, mask = _batch()
    config = get_preset("tiny_base")
    params = init_params(config, "ctc")
    g_scan = jax.jit(jax.grad(_ctc_loss_fn(config, audio, mask)))(params)
    g_unrolled = jax.jit(jax.grad(_ctc_loss_fn(config.replace(scan_layers=False), audio, mask)))(unstack_layers(params))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_scan, stack_layers(g_unrolled))


def test_bfloat16_compute_is_finite_and_close_to_float32():
    audio, mask = _batch()
    config = get_preset("tiny")
    params = init_params(config, "ctc")
    f32 = build_model(config, "ctc").apply({"params": params}, audio, mask).logits
    bf16 = build_model(config.replace(dtype="bfloat16"), "ctc").apply({"params": params}, audio, mask).logits
    assert bf16.dtype == jnp.float32 and np.isfinite(np.asarray(bf16)).all()
    rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
    print("bf16 vs f32 relative error", rel)
    assert rel < 0.05


def test_sharded_forward_and_gradients_match_single_device(cpu_devices, monkeypatch):
    """Params created already sharded on a (data=2, fsdp=2, tensor=2) mesh; same numbers as 1 device. The
    splash attention kernel (Pallas' interpreter here) runs per shard, batch over data+fsdp and heads over
    tensor as the rules say, and gives the same numbers too; so does the cuDNN call with its residuals named
    under `remat_policy=dots` (through jax's XLA kernel: CPUs have no cuDNN)."""
    from xlsr_jax.models import encoder

    config = get_preset("tiny")
    audio, mask = _batch(b=4)
    model = build_model(config, "ctc")
    params = init_params(config, "ctc")
    loss_fn = _ctc_loss_fn(config, audio, mask)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(params)

    mesh = Mesh(np.array(cpu_devices).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    shardings = param_shardings(abstract_params(config, "ctc"), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        init = jax.jit(lambda k, x: nn.meta.unbox(model.init(k, x)["params"]), out_shardings=shardings)
        sharded = init(jax.random.key(0), jnp.zeros((1, 16000)))
        kernel = sharded["wav2vec2"]["encoder"]["layers"]["feed_forward"]["intermediate_dense"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        # same init as the unsharded one, then the same loss and gradients
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6), sharded, params)
        batch_sharding = logical_sharding(("batch", "samples"), mesh)
        a, m = jax.device_put(audio, batch_sharding), jax.device_put(mask, batch_sharding)
        step = jax.jit(lambda p, a, m: jax.value_and_grad(_ctc_loss_fn(config, a, m))(p))
        loss, grads = step(sharded, a, m)
        splash = config.replace(attention_impl="splash")
        splash_step = jax.jit(lambda p, a, m: jax.value_and_grad(_ctc_loss_fn(splash, a, m))(p))
        jaxpr = str(jax.make_jaxpr(splash_step)(sharded, a, m))
        assert "shard_map" in jaxpr and "in_specs=(P(('data', 'fsdp'), 'tensor')" in jaxpr
        splash_loss, splash_grads = splash_step(sharded, a, m)
        dots = config.replace(remat_policy="dots")
        dot_product_attention = jax.nn.dot_product_attention
        with monkeypatch.context() as patch:
            patch.setattr(encoder, "attention_kernel", lambda cfg, deterministic: "cudnn")
            patch.setattr(jax.nn, "dot_product_attention",
                          lambda *args, implementation=None, **kwargs: dot_product_attention(*args, **kwargs))
            cudnn_step = jax.jit(lambda p, a, m: jax.value_and_grad(_ctc_loss_fn(dots, a, m))(p))
            assert encoder.FUSED_ATTENTION_RESIDUALS in str(jax.make_jaxpr(cudnn_step)(sharded, a, m))
            cudnn_loss, cudnn_grads = cudnn_step(sharded, a, m)
    for loss, grads in ((loss, grads), (splash_loss, splash_grads), (cudnn_loss, cudnn_grads)):
        assert abs(float(loss) - float(ref_loss)) < 1e-5
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), grads, ref_grads)


@pytest.mark.parametrize("kernel,groups,frames", [(16, 4, 50), (7, 2, 33), (12, 3, 20), (128, 16, 249)])
def test_tap_weight_grad_is_the_grouped_conv_weight_gradient(kernel, groups, frames):
    """The CPU path's weight gradient (matmuls over taps, 8 at a time, the last steps padded when the kernel is
    no multiple of 8) equals autodiff through the per-group convs; the input gradient is autodiff's too."""
    from xlsr_jax.models.encoder import grouped_time_conv

    channels = groups * 8
    rng = np.random.default_rng(kernel)
    x = jnp.asarray(rng.standard_normal((3, frames, channels)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((kernel, channels // groups, channels)) / kernel, jnp.float32)
    out, native = jax.vjp(lambda x, w: grouped_time_conv(x, w, groups, kernel // 2, "gpu"), x, weight)
    dy = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    cpu_out, cpu = jax.vjp(lambda x, w: grouped_time_conv(x, w, groups, kernel // 2, "cpu"), x, weight)
    np.testing.assert_array_equal(cpu_out, out)
    (dx, dw), (cpu_dx, cpu_dw) = native(dy), cpu(dy)
    np.testing.assert_array_equal(cpu_dx, dx)
    scale = float(jnp.max(jnp.abs(dw)))
    np.testing.assert_allclose(cpu_dw, dw, rtol=1e-5, atol=1e-6 * scale)


def test_the_cpu_weight_gradient_of_a_split_batch_all_reduces_once_outside_its_loop(cpu_devices):
    """With the batch split over 8 devices, the taps' scan adds partial sums per device and one all-reduce
    after the loop sums them: none inside the loop, where it would run once per scan step."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec

    from xlsr_jax.models.encoder import grouped_time_conv

    mesh = Mesh(np.array(cpu_devices), ("data",))
    x = jax.device_put(jnp.ones((8, 40, 32)), NamedSharding(mesh, PartitionSpec("data")))
    weight = jax.device_put(jnp.full((16, 8, 32), 0.01), NamedSharding(mesh, PartitionSpec()))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(grouped_time_conv(x, w, 4, 8, "cpu") ** 2), argnums=1))
    computations = re.split(r"\n(?=\S)", grad.lower(x, weight).compile().as_text())
    reduces = {c.split("(")[0]: c.count(" all-reduce(") for c in computations if " all-reduce(" in c}
    assert list(reduces.values()) == [1] and next(iter(reduces)).startswith("ENTRY"), reduces
    single = jax.jit(jax.grad(lambda x, w: jnp.sum(grouped_time_conv(x, w, 4, 8, "cpu") ** 2), argnums=1))
    np.testing.assert_allclose(grad(x, weight), single(np.ones((8, 40, 32)), np.full((16, 8, 32), 0.01)), rtol=1e-6)


def test_the_cpu_positional_conv_gives_the_models_gradients(monkeypatch):
    """The tiny model's loss and gradients with the CPU path of the positional conv equal XLA's autodiff, and
    the differentiated model has one conv fewer per group: the weight gradients are matmuls."""
    from xlsr_jax.models import encoder

    config = get_preset("tiny")
    audio, mask = _batch()
    params = init_params(config, "ctc")
    grad_fn = jax.jit(jax.value_and_grad(_ctc_loss_fn(config, audio, mask)))
    convs = grad_fn.lower(params).compile().as_text().count(" convolution(")
    loss, grads = grad_fn(params)
    native = encoder.grouped_time_conv
    monkeypatch.setattr(encoder, "grouped_time_conv", lambda x, w, g, p, platform: native(x, w, g, p, "gpu"))
    ref_fn = jax.jit(jax.value_and_grad(_ctc_loss_fn(config, audio, mask)))
    assert ref_fn.lower(params).compile().as_text().count(" convolution(") == convs + 4  # tiny: 4 groups
    ref_loss, ref_grads = ref_fn(params)
    assert float(loss) == float(ref_loss)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), grads, ref_grads)


def test_dropout_and_layerdrop_only_in_training():
    audio, mask = _batch()
    config = get_preset("tiny", layerdrop=0.0)
    model = build_model(config, "base")
    params = init_params(config, "base")
    det = model.apply({"params": params}, audio, mask).last_hidden_state
    again = model.apply({"params": params}, audio, mask).last_hidden_state
    np.testing.assert_array_equal(det, again)
    train = model.apply({"params": params}, audio, mask, deterministic=False,
                        rngs={"dropout": jax.random.key(1)}).last_hidden_state
    assert float(jnp.abs(train - det).max()) > 1e-3
    # layerdrop=1 with no dropout skips every layer: each hidden state equals the transformer input.
    skip_all = get_preset("tiny", layerdrop=1.0, hidden_dropout=0.0, activation_dropout=0.0,
                          attention_dropout=0.0, feat_proj_dropout=0.0)
    out = build_model(skip_all, "base").apply({"params": params}, audio, mask, deterministic=False,
                                              output_hidden_states=True, rngs={"dropout": jax.random.key(2)})
    for h in out.hidden_states[1:]:
        np.testing.assert_array_equal(h, out.hidden_states[0])


@pytest.mark.parametrize("mult", [0.1, 0.0])
def test_feature_grad_mult_scales_only_the_conv_encoder(mult):
    audio, mask = _batch()
    config = get_preset("tiny")
    params = init_params(config, "ctc")
    ref = jax.jit(jax.grad(_ctc_loss_fn(config, audio, mask)))(params)
    got = jax.jit(jax.grad(_ctc_loss_fn(config.replace(feature_grad_mult=mult), audio, mask)))(params)
    conv_ref, conv = ref["wav2vec2"]["feature_extractor"], got["wav2vec2"]["feature_extractor"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, mult * b, atol=1e-7, rtol=1e-4), conv, conv_ref)
    # Unchanged up to float reassociation (XLA fuses the program differently once the conv gradient is scaled).
    np.testing.assert_allclose(got["lm_head"]["kernel"], ref["lm_head"]["kernel"], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(conv_ref["conv_layers_0"]["kernel"]).max()) > 0


def test_padding_does_not_change_real_frames():
    """Layer-norm models: an utterance padded inside a batch gives its unpadded output on real frames."""
    config = get_preset("tiny")
    params = init_params(config, "base")
    model = build_model(config, "base")
    audio, mask = _batch(n=9600)
    n = int(mask[1].sum())
    batched = model.apply({"params": params}, audio, mask).last_hidden_state
    alone = model.apply({"params": params}, audio[1:, :n]).last_hidden_state
    frames = config.num_frames(n)
    np.testing.assert_allclose(batched[1, :frames], alone[0], atol=1e-5)


def test_time_and_channel_masks():
    config = get_preset("tiny", mask_time_prob=0.5)
    params = init_params(config, "base")
    model = build_model(config, "base")
    audio, mask = _batch()
    frames = config.num_frames(audio.shape[1])
    time_mask = jnp.zeros((2, frames), bool).at[:, :5].set(True)
    out = model.apply({"params": params}, audio, mask, mask_time_indices=time_mask, output_hidden_states=True)
    plain = model.apply({"params": params}, audio, mask, output_hidden_states=True)
    assert float(jnp.abs(out.hidden_states[0] - plain.hidden_states[0]).max()) > 1e-3
    chan = jnp.zeros((2, config.hidden_size), bool).at[:, :4].set(True)
    out = model.apply({"params": params}, audio, mask, mask_feature_indices=chan)
    assert out.last_hidden_state.shape == plain.last_hidden_state.shape
    no_embed = get_preset("tiny", mask_time_prob=0.0)
    with pytest.raises(ValueError, match="no masked_spec_embed"):
        build_model(no_embed, "base").apply({"params": init_params(no_embed, "base")}, audio, mask,
                                            mask_time_indices=time_mask)


@pytest.mark.parametrize("padded", [True, False])
def test_fused_attention_call_matches_materialized_scores(monkeypatch, padded):
    """The cuDNN branch's call (layout, frames padded to a multiple of 8, padding as key lengths) gives
    the einsum path's loss and gradients: run through `jax.nn.dot_product_attention`'s XLA kernel,
    since CPUs have no cuDNN."""
    from xlsr_jax.models import encoder

    audio, mask = _batch(n=7000)
    mask = mask if padded else None
    config = get_preset("tiny", hidden_dropout=0.0)
    assert config.num_frames(7000) % encoder.CUDNN_FRAME_MULTIPLE  # the frame padding is exercised
    params = init_params(config, "ctc")
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(_ctc_loss_fn(config, audio, mask)))(params)
    calls = []
    dot_product_attention = jax.nn.dot_product_attention

    def on_cpu(*args, implementation=None, **kwargs):
        calls.append((implementation, args[0].shape, kwargs["key_value_seq_lengths"]))
        return dot_product_attention(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(encoder, "attention_kernel", lambda cfg, deterministic: "cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)
    loss, grads = jax.jit(jax.value_and_grad(_ctc_loss_fn(config, audio, mask)))(params)
    assert calls[0][0] == "cudnn" and calls[0][1][1] % encoder.CUDNN_FRAME_MULTIPLE == 0
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def test_remat_dots_keeps_the_fused_attention_forward(monkeypatch):
    """Under `remat_policy=dots` the cuDNN call's output and residuals are kept (named, as splash's are),
    so the backward pass does not run its forward again: one softmax fewer in the differentiated program
    than with the call unnamed, and the same loss and gradients as XLA's attention under the same policy.
    The call runs through `jax.nn.dot_product_attention`'s XLA kernel, since CPUs have no cuDNN."""
    from xlsr_jax.models import encoder

    audio, mask = _batch(n=7000)
    config = get_preset("tiny", hidden_dropout=0.0, remat_policy="dots")
    params = init_params(config, "ctc")
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(_ctc_loss_fn(config.replace(attention_impl="xla"), audio,
                                                                  mask)))(params)
    dot_product_attention = jax.nn.dot_product_attention
    monkeypatch.setattr(encoder, "attention_kernel", lambda cfg, deterministic: "cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *args, implementation=None, **kwargs: dot_product_attention(*args, **kwargs))

    def softmaxes():  # a new function each time: jax reuses the trace of one it has seen
        return str(jax.make_jaxpr(jax.value_and_grad(_ctc_loss_fn(config, audio, mask)))(params)).count(" exp ")

    kept = softmaxes()
    with monkeypatch.context() as m:
        m.setattr(encoder, "with_named_residuals", lambda fn, name: fn)
        assert kept < softmaxes()
    loss, grads = jax.jit(jax.value_and_grad(_ctc_loss_fn(config, audio, mask)))(params)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def test_splash_attention_matches_materialized_scores():
    """The TPU splash kernel's branch (frames padded to its tiles, a padded row's padding masked as keys
    through segment ids, the scale folded into q), run by Pallas' interpreter on this CPU: the XLA path's
    loss and gradients."""
    from xlsr_jax.models import encoder

    audio, mask = _batch(n=7000)
    config = get_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0)
    assert config.num_frames(7000) % encoder.SPLASH_BLOCKS[-1]  # the frame padding is exercised
    params = init_params(config, "ctc")
    xla = config.replace(attention_impl="xla")
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(_ctc_loss_fn(xla, audio, mask)))(params)
    splash = jax.jit(jax.value_and_grad(_ctc_loss_fn(config.replace(attention_impl="splash"), audio, mask)))
    assert "pallas_call" in str(jax.make_jaxpr(splash)(params))
    loss, grads = splash(params)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def test_attention_kernel_choice():
    from xlsr_jax.config import ConfigError
    from xlsr_jax.models.encoder import attention_kernel

    bf16 = get_preset("tiny", dtype="bfloat16")
    assert jax.default_backend() == "cpu" and attention_kernel(bf16, deterministic=True) == "xla"
    assert attention_kernel(bf16.replace(attention_impl="xla"), deterministic=False) == "xla"
    assert attention_kernel(bf16.replace(attention_impl="cudnn"), deterministic=True) == "cudnn"
    with pytest.raises(ConfigError, match="needs dtype='bfloat16'"):
        get_preset("tiny", attention_impl="cudnn")
    with pytest.raises(ConfigError, match="head_dim <= 128"):
        get_preset("tiny", dtype="bfloat16", attention_impl="cudnn", hidden_size=36, num_attention_heads=2)
    with pytest.raises(ConfigError, match="attention_impl must be one of"):
        get_preset("tiny", attention_impl="flash")
