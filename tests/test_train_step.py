"""The train step: identical numbers on every mesh, gradient accumulation, the non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xlsr_jax.models.quantizer as quantizer_module
from xlsr_jax.config import get_preset
from xlsr_jax.models.heads import build_model
from xlsr_jax.objectives.contrastive import ContrastiveObjective
from xlsr_jax.objectives.masking import compute_span_mask, sample_negatives
from xlsr_jax.parallel.mesh import build_mesh
from xlsr_jax.parallel.rules import logical_sharding
from xlsr_jax.tasks import pretraining
from xlsr_jax.train.optim import make_optimizer
from xlsr_jax.train.state import create_train_state
from xlsr_jax.train.step import jit_train_step, make_train_step

# Tests here build the same state initialization, and on one device the same train step, more than once:
# each program is compiled once.
pytestmark = pytest.mark.usefixtures("compile_cache")

OPTIM = dict(schedule="polynomial", peak_lr=1e-3, warmup_steps=2, total_steps=10, clip_norm=10.0,
             weight_decay=0.01)
CONFIG = get_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                    mask_time_prob=0.65, vocab_size=32)


def _batch(config, b=8, seed=0):
    rng = np.random.default_rng(seed)
    n = 8000
    audio = rng.standard_normal((b, n)).astype(np.float32)
    mask = np.ones((b, n), np.int32)
    for i in range(1, b, 2):
        mask[i, n - 1600 * (1 + i % 3):] = 0
    audio *= mask
    lengths = config.num_frames(mask.sum(1))
    tm = compute_span_mask(config.num_frames(n), lengths, 0.65, 4, rng, min_masks=2)
    return {"input_values": audio, "attention_mask": mask, "mask_time_indices": tm,
            "sampled_negatives": sample_negatives(tm, 10, rng)}


def _setup(mesh_cfg, accum=1, devices=None, config=CONFIG):
    """(state, jitted step, batch sharding) on a mesh of `devices`."""
    mesh = build_mesh({"ici": mesh_cfg}, devices)
    model = build_model(config, "pretraining")
    optimizer, schedule = make_optimizer(OPTIM)
    state, shardings = create_train_state(model, optimizer, mesh, seed=0)
    # What training runs: activation constraints in context, gradients constrained to the params' shardings.
    step = make_train_step(model, optimizer, schedule, ContrastiveObjective(), accum_steps=accum, mesh=mesh,
                           param_shardings=shardings.params, sum_metrics=pretraining.SUM_METRICS)
    batch_sharding = logical_sharding(("batch",), mesh)
    return state, jit_train_step(step, shardings, batch_sharding), batch_sharding


def _run(mesh_cfg, steps=2, accum=1, devices=None, config=CONFIG):
    state, jstep, batch_sharding = _setup(mesh_cfg, accum, devices, config)
    history = []
    for i in range(steps):
        batch = jax.device_put(_batch(config, seed=i), batch_sharding)
        state, metrics = jstep(state, batch)
        history.append({k: float(v) for k, v in metrics.items()})
    return jax.device_get(state.params), history


@pytest.mark.slow
def test_same_loss_and_params_on_every_mesh(cpu_devices):
    # fsdp=8: parameters and optimizer state split 8 ways (gathered for the forward, gradients
    # reduce-scattered); 2x2x2: data, fsdp and tensor parallelism in one program (batch over data*fsdp,
    # gradients reduced over data replicas, heads and MLP over tensor). Pure data parallelism is that
    # data axis again (and what the `cpu` mesh preset trains the smoke runs with): no third compile for it.
    ref_params, ref_hist = _run({"data": 1}, devices=cpu_devices[:1])
    for mesh_cfg in ({"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
        params, hist = _run(mesh_cfg, devices=cpu_devices)
        for a, b in zip(hist, ref_hist):
            assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, abs(b["loss"])), (mesh_cfg, a["loss"], b["loss"])
            assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * max(1.0, b["grad_norm"]), mesh_cfg
        diff = max(float(np.abs(x - y).max()) for x, y in
                   zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)))
        print(mesh_cfg, "max param diff after 2 steps", diff, "loss", [h["loss"] for h in hist])
        assert diff < 1e-5, (mesh_cfg, diff)


def test_gradient_accumulation_equals_one_big_batch(cpu_devices, monkeypatch):
    # Gumbel noise is drawn per micro-batch key; take it out so both runs see the same quantizer. The
    # diversity term is the entropy of a batch average, so (as in fairseq with update_freq) it is not
    # additive over micro-batches: weight 0 here, everything else must match.
    monkeypatch.setattr(quantizer_module, "gumbel_noise", lambda key, shape: jnp.zeros(shape, jnp.float32))
    config = CONFIG.replace(diversity_loss_weight=0.0)
    p1, h1 = _run({"data": 2}, steps=1, accum=1, devices=cpu_devices[:2], config=config)
    p2, h2 = _run({"data": 2}, steps=1, accum=2, devices=cpu_devices[:2], config=config)
    assert abs(h1[0]["loss"] - h2[0]["loss"]) < 1e-5
    assert h1[0]["num_masked"] == h2[0]["num_masked"]
    assert abs(h1[0]["grad_norm"] - h2[0]["grad_norm"]) < 1e-5 * h1[0]["grad_norm"]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), p1, p2)


def test_nonfinite_step_is_skipped_and_counted(cpu_devices):
    # The step as training jits it; on one device, the same program as the mesh test's reference.
    state, step, batch_sharding = _setup({"data": 1}, devices=cpu_devices[:1])
    before = jax.device_get(state.params)
    bad = _batch(CONFIG)
    bad["input_values"][0, 100] = np.nan
    state, metrics = step(state, jax.device_put(bad, batch_sharding))
    assert not bool(metrics["finite"]) and int(state.skipped) == 1 and int(state.nonfinite_streak) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    state, metrics = step(state, jax.device_put(_batch(CONFIG), batch_sharding))
    assert bool(metrics["finite"]) and int(state.skipped) == 1 and int(state.nonfinite_streak) == 0
    assert int(state.step) == 2


def test_weight_decay_mask_and_freezing():
    from xlsr_jax.models.heads import init_params
    from xlsr_jax.train.optim import decay_mask

    params = init_params(CONFIG, "ctc")
    mask = decay_mask(params)
    enc = mask["wav2vec2"]["encoder"]
    assert enc["layers"]["attention"]["q_proj"]["kernel"] and not enc["layers"]["attention"]["q_proj"]["bias"]
    assert not enc["layers"]["layer_norm"]["scale"] and not enc["pos_conv_embed"]["weight_g"]
    # fairseq decays every parameter: with decay_all_params a LayerNorm scale (init 1) with zero gradient shrinks.
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    for decay_all in (False, True):
        tx, _ = make_optimizer(dict(OPTIM, decay_all_params=decay_all, warmup_steps=0))
        updates, _ = tx.update(zero, tx.init(params), params)
        scale = updates["wav2vec2"]["encoder"]["layers"]["layer_norm"]["scale"]
        kernel = updates["wav2vec2"]["encoder"]["layers"]["attention"]["q_proj"]["kernel"]
        assert float(jnp.abs(kernel).max()) > 0 and (float(jnp.abs(scale).max()) > 0) == decay_all
    optimizer, _ = make_optimizer(dict(OPTIM, freeze_feature_encoder=True, freeze_encoder_steps=2))
    opt_state = optimizer.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for i in range(3):  # the optimizer reads the global step (the train step passes state.step)
        updates, opt_state = optimizer.update(grads, opt_state, params, global_step=jnp.asarray(i, jnp.int32))
        conv = updates["wav2vec2"]["feature_extractor"]["conv_layers_0"]["kernel"]
        layer = updates["wav2vec2"]["encoder"]["layers"]["attention"]["q_proj"]["kernel"]
        head = updates["lm_head"]["kernel"]
        assert float(jnp.abs(conv).max()) == 0.0  # frozen for good, weight decay included
        assert (float(jnp.abs(layer).max()) == 0.0) == (i < 2)  # frozen for the first 2 updates
        assert float(jnp.abs(head).max()) > 0.0 or i == 0  # lr is 0 at step 0 (warmup)
