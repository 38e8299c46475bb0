"""Mesh config validation and presets; checkpoints: torn saves ignored, export to a model directory."""

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

from xlsr_jax.config import PRESETS, ConfigError, get_preset
from xlsr_jax.parallel.mesh import (MESH_PRESETS, build_mesh, build_run_mesh, mesh_shape, preset_platform,
                                   resolve_mesh_config, validate_for_model)
from xlsr_jax.train.checkpoint import MIN_REPLICA_SLICE_BYTES, Checkpointer, abstract_with_shardings

# chips per preset name (TPU chips: v4/v5p "-N" counts TensorCores, 2 per chip)
CHIPS = {"v4-8": 4, "v4-128": 64, "v5e-8": 8, "v5e-256": 256, "v5p-128": 64, "v6e-256": 256, "gpu-1x8": 8}


def test_mesh_shapes_and_messages():
    assert mesh_shape({"ici": {"data": -1, "fsdp": 2}}, 8) == ([4, 2, 1], [1, 1, 1])
    assert mesh_shape({"ici": {"fsdp": -1}, "dcn": {"data": 2}}, 16, num_slices=2) == ([1, 8, 1], [2, 1, 1])
    with pytest.raises(ConfigError, match="has 6 devices but 8 are available"):
        mesh_shape({"ici": {"data": 3, "fsdp": 2}}, 8)
    with pytest.raises(ConfigError, match="unknown axis name"):
        mesh_shape({"ici": {"model": 2}}, 8)
    with pytest.raises(ConfigError, match="at most one -1"):
        mesh_shape({"ici": {"data": -1, "fsdp": -1}}, 8)
    with pytest.raises(ConfigError, match="unknown mesh_preset"):
        resolve_mesh_config("v9-1", {})


def test_a_pod_preset_that_does_not_fit_this_platform_says_where_to_run_it(cpu_devices):
    """A GPU or TPU preset on devices of another platform that it does not fit (a GPU node whose jax has no
    CUDA sees only its CPUs): the device-count error says which machines and install the preset needs."""
    assert [preset_platform(p) for p in ("gpu-4x8", "v5p-128", "2x v5e-256", "cpu", "")] == ["gpu", "tpu", "tpu",
                                                                                            None, None]
    with pytest.raises(ConfigError, match=r"has 8 devices but 4 are available.*'gpu-1x8' is for GPUs but JAX sees "
                                          r"4 cpu device\(s\).*pip install 'xlsr-jax\[gpu\]'"):
        build_run_mesh("gpu-1x8", {}, cpu_devices[:4])
    with pytest.raises(ConfigError, match=r"'v5p-128' is for TPUs .*pip install 'xlsr-jax\[tpu\]'"):
        build_run_mesh("v5p-128", {}, cpu_devices)
    with pytest.raises(ConfigError, match="available; use -1 on one axis to fill$"):  # no hint: CPU's own preset
        build_run_mesh("", {"ici": {"data": 3}}, cpu_devices)
    assert build_run_mesh("gpu-1x8", {}, cpu_devices).shape == {"data": 1, "fsdp": 8, "tensor": 1}  # it fits: runs


def test_every_mesh_preset_fits_its_machine_and_the_xlsr_models():
    for name, mesh in MESH_PRESETS.items():
        if name == "cpu":
            continue
        slices = int(np.prod(list(mesh["dcn"].values()) or [1]))
        chips = CHIPS[name.split(" ")[-1]] if name.split(" ")[-1] in CHIPS else 8
        ici, dcn = mesh_shape(mesh, chips * slices, num_slices=slices)
        assert int(np.prod(ici)) == chips, name
        tensor = ici[2] * dcn[2]
        for preset in ("xlsr_300m", "xlsr_1b", "xlsr_2b"):
            cfg = PRESETS[preset]
            assert cfg.num_attention_heads % tensor == 0 and cfg.intermediate_size % tensor == 0, (name, preset)
            fsdp = ici[1] * dcn[1]
            assert cfg.hidden_size % fsdp == 0 and cfg.conv_dim[-1] % fsdp == 0, (name, preset)


def test_validate_for_model_messages(cpu_devices):
    mesh = build_mesh({"ici": {"data": 2, "fsdp": 1, "tensor": 4}}, cpu_devices)
    with pytest.raises(ConfigError) as err:
        validate_for_model(mesh, get_preset("tiny", num_attention_heads=2, intermediate_size=66), global_batch=3)
    msg = str(err.value)
    assert "num_attention_heads=2 is not divisible by mesh tensor=4" in msg
    assert "intermediate_size=66" in msg and "global batch 3 is not divisible by data*fsdp=2" in msg
    validate_for_model(mesh, get_preset("tiny"), global_batch=8)


def test_torn_save_is_never_restored(tmp_path, cpu_devices):
    mesh = build_mesh({"ici": {"fsdp": 8}}, cpu_devices)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    state = {"w": jax.device_put(jnp.arange(16.0), sharding), "step": jax.device_put(jnp.int32(0))}
    ckpt = Checkpointer(tmp_path / "ckpt", keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": state["w"] * step, "step": jnp.int32(step)})
    ckpt.wait()
    # A save killed mid-write leaves a temporary directory: it must not count as a step.
    torn = tmp_path / "ckpt" / "3.orbax-checkpoint-tmp-1234"
    torn.mkdir()
    (torn / "garbage").write_text("partial")
    ckpt.close()
    reopened = Checkpointer(tmp_path / "ckpt", keep=5)
    assert reopened.latest_step() == 2
    abstract = abstract_with_shardings(jax.eval_shape(lambda: state),
                                       {"w": sharding, "step": jax.sharding.SingleDeviceSharding(cpu_devices[0])})
    step, restored = reopened.restore(abstract)
    assert step == 2 and float(restored["w"][3]) == 6.0 and restored["w"].sharding == sharding
    reopened.close()


def test_small_replicated_arrays_are_saved_without_compiling(tmp_path, cpu_devices):
    """Orbax slices an array the 8 devices replicate so that each replica writes a part: a jitted program per
    shape. Below MIN_REPLICA_SLICE_BYTES per slice one replica writes it all, compiling nothing; a large array
    is still spread (its slices compile). Both restore exactly."""
    replicated = jax.sharding.NamedSharding(build_mesh({"ici": {"data": 8}}, cpu_devices), jax.sharding.PartitionSpec())
    rows = MIN_REPLICA_SLICE_BYTES // 4 // 1024  # float32 rows of 1024: one slice per replica is 1/8 of them
    small = {f"b{i}": jax.device_put(jnp.full((8 * (i + 1), 4), float(i)), replicated) for i in range(6)}
    large = {"w": jax.device_put(jnp.arange(8 * rows * 1024, dtype=jnp.float32).reshape(8 * rows, 1024), replicated)}
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    try:
        ckpt.save(1, small)
        ckpt.wait()
        assert compiles == [], len(compiles)
        ckpt.save(2, large)
        ckpt.wait()
        assert compiles, "the large array was not written replica-parallel"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    for step, state in ((1, small), (2, large)):
        _, restored = ckpt.restore(abstract_with_shardings(jax.eval_shape(lambda s=state: s),
                                                           jax.tree.map(lambda _: replicated, state)), step=step)
        for key in state:
            np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key]))
    ckpt.close()


@pytest.mark.slow
def test_export_checkpoint_to_model_dir(tmp_path):
    from xlsr_jax.cli import main
    from xlsr_jax.experiment import load_experiment
    from xlsr_jax.model_dir import load_model_dir
    from xlsr_jax.train.loop import train_and_evaluate

    config = load_experiment("experiments/pretrain_xlsr.py:smoke",
                             ["--config.train.steps=2", "--config.train.eval_every=0", "--config.data.num_buckets=1"])
    result = train_and_evaluate(config, tmp_path / "run")
    assert main(["export", "--workdir", str(tmp_path / "run"), "--output", str(tmp_path / "model")]) == 0
    cfg, head, params = load_model_dir(tmp_path / "model")
    assert head == "pretraining" and cfg.hidden_size == get_preset("tiny").hidden_size
    trained = jax.device_get(result.state.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, trained)
