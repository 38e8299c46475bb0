"""The training loop: smoke preset, exact resume, elastic restore, non-finite stop (8 fake CPU devices)."""

import shutil

import jax
import numpy as np
import pytest

from xlsr_jax.experiment import load_experiment
from xlsr_jax.train.loop import TrainingError, train_and_evaluate

EXPERIMENT = "experiments/pretrain_xlsr.py:smoke"


def _config(data_dir, **overrides):
    base = {"data.dir": str(data_dir), "train.eval_every": 0, "train.log_every": 1, "data.num_buckets": 1,
            "train.checkpoint_every": 3}
    base.update(overrides)
    return load_experiment(EXPERIMENT, [f"--config.{k}={v}" for k, v in base.items()])


def _params(result):
    return jax.tree_util.tree_leaves(jax.device_get(result.state.params))


# The resume tests start from one checkpoint: fully sharded (fsdp) over the 8 devices.
SOURCE_MESH = {"mesh_preset": "''", "mesh.ici.data": 1, "mesh.ici.fsdp": 8, "mesh.ici.tensor": 1}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir, compile_cache):
    """6 steps in one go, and a run of the same config stopped at its step-3 checkpoint (a workdir to copy)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    full = train_and_evaluate(_config(data_dir, **{"train.steps": 6}, **SOURCE_MESH), root / "full")
    first = train_and_evaluate(_config(data_dir, **{"train.steps": 3}, **SOURCE_MESH), root / "stopped")
    assert first.step == 3 and [h["loss"] for h in first.history] == [h["loss"] for h in full.history[:3]]
    return {"history": full.history, "params": _params(full), "stopped": root / "stopped"}


def _stopped_copy(uninterrupted, workdir):
    """This test's own copy of the workdir stopped at step 3 (resuming writes into it)."""
    shutil.copytree(uninterrupted["stopped"], workdir)
    return workdir


@pytest.mark.slow
def test_smoke_preset_trains_and_evaluates(tmp_path):
    """The CI smoke run: the embedded corpus is prepared on first use; loss goes down; eval runs."""
    config = load_experiment(EXPERIMENT)
    result = train_and_evaluate(config, tmp_path)
    assert result.step == config.train.steps and not result.preempted
    losses = [h["loss"] for h in result.history]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert result.eval_history and np.isfinite(result.eval_history[-1]["loss"])
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= len(result.history)
    from tensorboard.backend.event_processing import event_accumulator

    board = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [h["step"] for h in result.history]
    assert np.allclose([e.value for e in board.Scalars("train/loss")], losses, rtol=1e-6)
    assert [e.step for e in board.Scalars("eval/loss")] == [h["step"] for h in result.eval_history]
    assert (tmp_path / "data" / "dataset.json").is_file()


@pytest.mark.slow
def test_exact_resume_equals_uninterrupted(tmp_path, data_dir, uninterrupted):
    workdir = _stopped_copy(uninterrupted, tmp_path / "resumed")
    # Profiling two steps after the first resumed one (train.profile_steps) changes no number.
    profiled = {"train.profile_steps": 2, "train.profile_skip": 1}
    second = train_and_evaluate(_config(data_dir, **{"train.steps": 6}, **SOURCE_MESH, **profiled), workdir)
    assert second.step == 6 and [h["step"] for h in second.history] == [4, 5, 6]
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    # Same data order and the same numbers, bit for bit.
    full = uninterrupted["history"]
    assert [h["loss"] for h in second.history] == [h["loss"] for h in full[3:]]
    assert [h["num_masked"] for h in second.history] == [h["num_masked"] for h in full[3:]]
    for a, b in zip(_params(second), uninterrupted["params"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_elastic_restore_onto_another_mesh(tmp_path, data_dir, uninterrupted):
    """fsdp over 8 devices -> fsdp 2 x tensor 2 over 4 of them: other axes, other shardings, fewer devices."""
    workdir = _stopped_copy(uninterrupted, tmp_path / "elastic")
    moved = {"mesh_preset": "''", "mesh.num_devices": 4, "mesh.ici.data": 1, "mesh.ici.fsdp": 2, "mesh.ici.tensor": 2}
    second = train_and_evaluate(_config(data_dir, **{"train.steps": 6}, **moved), workdir)
    assert [h["step"] for h in second.history] == [4, 5, 6]
    for a, b in zip(second.history, uninterrupted["history"][3:]):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1.0, abs(b["loss"])), (a["loss"], b["loss"])
    leaf = second.state.params["wav2vec2"]["encoder"]["layers"]["feed_forward"]["intermediate_dense"]["kernel"]
    assert len(leaf.sharding.device_set) == 4 and set(leaf.sharding.spec) >= {"fsdp", "tensor"}, leaf.sharding


@pytest.mark.slow
def test_nonfinite_streak_stops_with_last_good_checkpoint(tmp_path, data_dir):
    config = _config(data_dir, **{"train.steps": 12, "optim.peak_lr": 1e30, "optim.warmup_steps": 0,
                                  "optim.clip_norm": 0.0, "train.max_nonfinite_streak": 2,
                                  "train.checkpoint_every": 1})
    with pytest.raises(TrainingError, match="consecutive steps had a non-finite") as err:
        train_and_evaluate(config, tmp_path)
    assert "last good checkpoint" in str(err.value)
    from xlsr_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "checkpoints")
    latest = ckpt.latest_step()
    assert latest is not None
    restored = ckpt.read_state(latest)["params"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored))
