"""The loop keeps JAX's persistent compilation cache in the workdir: a restarted run loads its compiled
train step instead of compiling it again, and the process's cache setting is restored afterwards."""

import jax
import jax.monitoring
import pytest

from xlsr_jax.experiment import load_experiment
from xlsr_jax.train.loop import train_and_evaluate

PERSISTENT_COMPILE_CACHE = False  # what is tested here is the workdir cache, set up by the loop

# JAX's cache alone: the kept executables (train.keep_executables, tests/test_executables.py) would serve the
# restart before JAX's cache is asked.
OVERRIDES = ["--config.train.eval_every=0", "--config.train.log_every=1", "--config.data.num_buckets=1",
             "--config.train.checkpoint_every=2", "--config.train.keep_executables=False"]


@pytest.mark.slow
def test_a_restart_loads_the_compiled_step_from_the_workdir(tmp_path):
    assert jax.config.jax_compilation_cache_dir is None  # no session cache in this module
    workdir = tmp_path / "run"
    first = train_and_evaluate(load_experiment("experiments/pretrain_xlsr.py:smoke",
                                               [*OVERRIDES, "--config.train.steps=2"]), workdir)
    assert first.step == 2 and jax.config.jax_compilation_cache_dir is None  # restored after the run
    entries = {p.name for p in (workdir / "compile_cache").iterdir()}
    assert entries  # the train step (and whatever else took over a second to compile)

    hits = []

    def listener(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(listener)
    try:
        second = train_and_evaluate(load_experiment("experiments/pretrain_xlsr.py:smoke",
                                                    [*OVERRIDES, "--config.train.steps=4"]), workdir)
    finally:
        jax.monitoring.unregister_event_listener(listener)
    assert second.step == 4 and [h["step"] for h in second.history] == [3, 4]
    assert hits, "the resumed run compiled its train step again instead of loading it"
    # The resumed run wrote nothing new: every program it needed over a second to compile was loaded.
    assert {p.name for p in (workdir / "compile_cache").iterdir()} == entries

