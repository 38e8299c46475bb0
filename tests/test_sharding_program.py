"""The train step as `train` runs it and `fit` compiles it: sharding annotations and collectives in the program.

Everything here lowers `build_program(...).train_step` (the object the loop calls) on 8 fake CPU
devices and reads the lowered StableHLO and compiled HLO text.
"""

import jax
import numpy as np
import pytest

import xlsr_jax.train.step as step_module
from xlsr_jax.config import ConfigError
from xlsr_jax.experiment import load_experiment
from xlsr_jax.parallel.hlo import collective_stats, count_sharding_annotations
from xlsr_jax.parallel.rules import DEFAULT_RULES, rules_from_config, rules_to_config
from xlsr_jax.train.fit import fit_program
from xlsr_jax.train.program import abstract_batch

SAMPLES = 16_000


def _program(cpu_devices, mesh, batch=16, accum=1, extra=()):
    overrides = [f"--config.data.global_batch_size={batch}", f"--config.train.accum_steps={accum}",
                 "--config.mesh_preset=''"] + [f"--config.mesh.ici.{k}={v}" for k, v in mesh.items()] + list(extra)
    config = load_experiment("experiments/pretrain_xlsr.py:smoke", overrides)
    return fit_program(config, cpu_devices)


def _lower(program, batch=16):
    return program.train_step.lower(program.abstract_state_with_shardings(), abstract_batch(program, batch, SAMPLES))


@pytest.mark.parametrize("mesh,axis", [({"data": 8, "fsdp": 1}, "data"), ({"data": 1, "fsdp": 8}, "fsdp"),
                                       ({"data": 2, "fsdp": 2, "tensor": 2}, "tensor")])
def test_activation_constraints_are_in_the_lowered_train_step(cpu_devices, mesh, axis):
    text = _lower(_program(cpu_devices, mesh)).as_text()
    constraints = [line for line in text.splitlines() if "sdy.sharding_constraint" in line]
    # Every encoder activation, both passes, plus the gathered conv kernels.
    assert count_sharding_annotations(text) >= 60, count_sharding_annotations(text)
    assert any(f'"{axis}"' in line for line in constraints), f"no constraint names mesh axis {axis}"


def test_without_the_sharding_context_constraints_vanish(cpu_devices):
    # The guard for the bug this replaces: flax drops constraints when no rules are in context.
    program = _program(cpu_devices, {"data": 8, "fsdp": 1})
    bare = step_module.make_train_step(program.model, program.optimizer, program.schedule, program.task.objective)
    lowered = jax.jit(bare).lower(program.abstract_state_with_shardings(), abstract_batch(program, 16, SAMPLES))
    assert count_sharding_annotations(lowered.as_text()) == 0


def _contiguous_split(batch, accum_steps):
    return jax.tree_util.tree_map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)


@pytest.mark.slow
def test_strided_micro_batches_move_no_data(cpu_devices, monkeypatch):
    program = _program(cpu_devices, {"data": 8, "fsdp": 1}, accum=2)
    stats = collective_stats(_lower(program).compile().as_text())
    print("strided, data=8, B=16, accum=2:", stats.rows())
    assert stats.counts["all-gather"] == 0 and stats.counts["all-to-all"] == 0
    assert stats.counts["collective-permute"] == 0
    # The contiguous split this replaced gathers the batch across devices.
    monkeypatch.setattr(step_module, "split_micro_batches", _contiguous_split)
    contiguous = collective_stats(_lower(_program(cpu_devices, {"data": 8, "fsdp": 1}, accum=2)).compile().as_text())
    print("contiguous:", contiguous.rows())
    assert contiguous.counts["all-gather"] + contiguous.counts["all-to-all"] > 0


def test_fsdp_gathers_parameters_inside_the_layer_scan(cpu_devices):
    program = _program(cpu_devices, {"data": 1, "fsdp": 8})
    stats = collective_stats(_lower(program).compile().as_text())
    print("fsdp=8:", stats.rows(), "in loops:", stats.in_loops)
    layers = program.model_config.num_hidden_layers
    # Each layer gathers its own weights in the scan body (forward and backward), never the whole stack.
    assert stats.in_loops["all-gather"] >= 2 * layers
    assert stats.unknown_trip_counts == 0


def test_micro_batches_must_divide_over_the_batch_shards(cpu_devices):
    with pytest.raises(ConfigError, match="multiple of 16"):
        _program(cpu_devices, {"data": 8, "fsdp": 1}, batch=8, accum=2)


def test_rules_round_trip_and_overrides():
    assert rules_from_config(rules_to_config()) == DEFAULT_RULES
    config = load_experiment("experiments/pretrain_xlsr.py:smoke",
                             ["--config.sharding.rules.conv_out=", "--config.sharding.rules.mlp=fsdp,tensor",
                              "--config.sharding.rules.embed=None"])
    rules = dict(rules_from_config(dict(config.sharding.rules)))
    assert rules["conv_out"] is None and rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor")
    with pytest.raises(ConfigError, match="mesh axis"):
        rules_from_config({"embed": "fdsp"})
    with pytest.raises(ConfigError, match="unknown config key"):
        load_experiment("experiments/pretrain_xlsr.py:smoke", ["--config.sharding.rules.embedding=fsdp"])


def test_rules_from_the_config_reach_the_parameters(cpu_devices):
    default = _program(cpu_devices, {"data": 1, "fsdp": 8})
    replicated = _program(cpu_devices, {"data": 1, "fsdp": 8}, extra=["--config.sharding.rules.embed="])
    q = lambda p: p.state_shardings.params["wav2vec2"]["encoder"]["layers"]["attention"]["q_proj"]["kernel"]  # noqa: E731
    assert q(default).spec[1] == "fsdp"
    assert q(replicated).spec[1] is None  # heads still name `tensor`, which is 1 on this mesh
    shape = default.abstract_state.params["wav2vec2"]["encoder"]["layers"]["attention"]["q_proj"]["kernel"].shape
    assert q(default).shard_shape(shape)[1] * 8 == shape[1]
    assert np.prod(q(replicated).shard_shape(shape)) == np.prod(shape)


def test_init_from_reads_each_array_straight_into_its_shards(cpu_devices, tmp_path, monkeypatch):
    import xlsr_jax.model_dir as model_dir_module
    from xlsr_jax.config import get_preset
    from xlsr_jax.model_dir import save_model_dir
    from xlsr_jax.models.heads import init_params
    from xlsr_jax.train.loop import init_encoder_from
    from xlsr_jax.train.state import create_train_state

    source = get_preset("tiny", hidden_size=64, intermediate_size=128, num_attention_heads=4)
    pretrained = init_params(source, "pretraining", seed=3)
    save_model_dir(tmp_path / "pre", source, pretrained, "pretraining")
    program = _program(cpu_devices, {"data": 1, "fsdp": 8},
                       extra=["--config.model.overrides.hidden_size=64", "--config.model.overrides.intermediate_size=128",
                              "--config.model.overrides.num_attention_heads=4"])
    loaded = {}
    real_load = model_dir_module.load_model_dir

    def spy(*args, **kwargs):
        loaded["result"] = real_load(*args, **kwargs)
        return loaded["result"]

    monkeypatch.setattr(model_dir_module, "load_model_dir", spy)
    state, shardings = create_train_state(program.model, program.optimizer, program.mesh, program.rules)
    state = init_encoder_from(state, shardings, str(tmp_path / "pre"), program.mesh, program.rules)
    _, _, arrays = loaded["result"]
    sharded = 0
    for path, x in jax.tree_util.tree_leaves_with_path(arrays["wav2vec2"]):
        shard_shapes = {s.data.shape for s in x.addressable_shards}
        assert len(x.addressable_shards) == 8
        if "fsdp" in [a for a in x.sharding.spec if a]:  # read as 1/8 slices: no device ever held it whole
            sharded += 1
            assert shard_shapes == {x.sharding.shard_shape(x.shape)} and shard_shapes != {x.shape}, path
    assert sharded >= 10
    # And the values are the pretrained ones, in the run's layout.
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params["wav2vec2"]),
                           pretrained["wav2vec2"])
