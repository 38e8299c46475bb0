"""Compiled train steps kept in the workdir (xlsr_jax.train.executables): a restart runs the kept executable
without tracing, bit for bit as the uninterrupted run; a changed program compiles again; a bad entry is
replaced; the keys left out of the fingerprint really do not change the program."""

import concurrent.futures
import contextlib
import logging
import re
import threading

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

from xlsr_jax.experiment import load_experiment
from xlsr_jax.train.executables import HOST_ONLY_TRAIN_KEYS, StepExecutables, environment_fingerprint
from xlsr_jax.train.fit import fit_program
from xlsr_jax.train.loop import train_and_evaluate
from xlsr_jax.train.program import abstract_batch

EXPERIMENT = "experiments/pretrain_xlsr.py:smoke"
# Each run uses its workdir's own JAX cache (the loop's default), so a step is compiled, not loaded from a
# cache another test filled: only a step compiled in the process is kept (see executables.py).
PERSISTENT_COMPILE_CACHE = False
LOGGER = "xlsr_jax.train.executables"


def _config(data_dir, **overrides):
    base = {"data.dir": str(data_dir), "train.eval_every": 0, "train.log_every": 1, "data.num_buckets": 1,
            "train.checkpoint_every": 2, "optim.total_steps": 4}
    base.update(overrides)
    return load_experiment(EXPERIMENT, [f"--config.{k}={v}" for k, v in base.items()])


def _traced_train_steps():
    """A list that collects the train step's tracings while the returned listener is registered."""
    traced = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration" and "train_step" in str(kwargs.get("fun_name", "")):
            traced.append(kwargs["fun_name"])

    return traced, listener


@contextlib.contextmanager
def _tracing_threads(function: str):
    """Yields a list that collects the thread name of each tracing of `function` while the context is open."""
    threads = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration" and function in str(kwargs.get("fun_name", "")):
            threads.append(threading.current_thread().name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield threads
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _params(result):
    return jax.tree_util.tree_leaves(jax.device_get(result.state.params))


@pytest.mark.slow
def test_a_restart_runs_the_kept_step_untraced_and_equals_the_uninterrupted_run(tmp_path, data_dir, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    # Compiled where it is needed (no background thread), against the runs below that compile ahead.
    full = train_and_evaluate(_config(data_dir, **{"train.steps": 4, "train.compile_threads": 0}), tmp_path / "full")
    first = train_and_evaluate(_config(data_dir, **{"train.steps": 2}), tmp_path / "run")
    kept = sorted((tmp_path / "run" / "compile_cache" / "executables").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("train_step-") and first.step == 2

    traced, listener = _traced_train_steps()
    jax.monitoring.register_event_duration_secs_listener(listener)
    caplog.clear()
    try:
        # The restart extends the run (train.steps, a host-only key) and logs less often: the same program.
        second = train_and_evaluate(_config(data_dir, **{"train.steps": 4, "train.log_every": 2}), tmp_path / "run")
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert traced == [], "the restart traced its train step instead of loading the kept executable"
    assert any("loaded the compiled train step" in r.getMessage() for r in caplog.records)
    assert second.step == 4
    for a, b in zip(_params(second), _params(full)):
        np.testing.assert_array_equal(a, b)
    assert sorted((tmp_path / "run" / "compile_cache" / "executables").iterdir()) == kept

    # Another program (a learning rate is a constant in the step): compiled and kept beside the first.
    third = train_and_evaluate(_config(data_dir, **{"train.steps": 6, "optim.peak_lr": 2e-3}), tmp_path / "run")
    assert third.step == 6
    assert len(list((tmp_path / "run" / "compile_cache" / "executables").iterdir())) == 2


@pytest.mark.slow
def test_an_unreadable_entry_is_replaced_and_the_run_goes_on(tmp_path, data_dir, caplog):
    first = train_and_evaluate(_config(data_dir, **{"train.steps": 2}), tmp_path / "run")
    (entry,) = (tmp_path / "run" / "compile_cache" / "executables").iterdir()
    entry.write_bytes(entry.read_bytes()[:1000])  # torn
    for cached in (tmp_path / "run" / "compile_cache").glob("jit_train_step-*"):  # JAX's entry: compile anew
        cached.unlink()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    second = train_and_evaluate(_config(data_dir, **{"train.steps": 4}), tmp_path / "run")
    assert first.step == 2 and second.step == 4
    assert any("could not load the compiled train step" in r.getMessage() for r in caplog.records)
    assert entry.stat().st_size > 100_000  # written again, whole


@pytest.mark.slow
def test_the_loop_compiles_every_bucket_and_the_evaluation_ahead_and_trains_as_without(tmp_path, data_dir, caplog):
    """Two length buckets and an evaluation: each program compiles once, the train steps' on the background
    thread (the first batch's while the state initializes), and the run equals one that compiles each program
    on the loop's thread when it is needed."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    runs, compiles = {}, {}
    for threads in (0, 1):
        config = _config(data_dir, **{"data.num_buckets": 2, "train.steps": 4, "train.compile_threads": threads,
                                      "train.keep_executables": False, "train.eval_every": 4,
                                      "train.eval_batches": 2})
        caplog.clear()
        runs[threads] = train_and_evaluate(config, tmp_path / str(threads))
        # "compiled the <step> for batch shapes <shapes>, static arguments <static>, in <s> s on <thread>"
        found = [re.match(r"compiled the (.+) for batch shapes (.+), in [\d.]+ s on (\S+)$", r.getMessage())
                 for r in caplog.records]
        compiles[threads] = [m.groups() for m in found if m]
        programs = [(step, shapes) for step, shapes, _ in compiles[threads]]
        assert len(programs) == len(set(programs)), compiles  # a prepared program is found, not compiled again
    assert {thread for _, _, thread in compiles[0]} == {"MainThread"}
    assert sorted(p[:2] for p in compiles[1]) == sorted(p[:2] for p in compiles[0])  # and nothing unused
    train = [thread for step, _, thread in compiles[1] if step == "train step"]
    evaluation = [thread for step, _, thread in compiles[1] if step == "evaluation step"]
    assert len(train) == 2 and all(t.startswith("compile_") for t in train), compiles  # both buckets trained on
    # The evaluation's programs were queued behind the train steps': the loop takes over one not started yet.
    assert evaluation and evaluation[0].startswith("compile_"), compiles
    assert [h["loss"] for h in runs[1].history] == [h["loss"] for h in runs[0].history]
    assert runs[1].eval_history == runs[0].eval_history
    for a, b in zip(_params(runs[1]), _params(runs[0])):
        np.testing.assert_array_equal(a, b)


def test_keep_executables_false_keeps_nothing(tmp_path, data_dir):
    train_and_evaluate(_config(data_dir, **{"train.steps": 1, "train.keep_executables": False}), tmp_path)
    assert not (tmp_path / "compile_cache" / "executables").exists()


def test_the_keys_left_out_of_the_fingerprint_do_not_change_the_program(cpu_devices, data_dir):
    """Every HOST_ONLY_TRAIN_KEYS value changed at once: the same lowered train step. A key the step reads
    (the learning rate) changes both the program and the fingerprint."""
    changed = {"train.steps": 999, "train.log_every": 7, "train.eval_every": 5, "train.checkpoint_every": 9,
               "train.keep_checkpoints": 1, "train.best_metric": "loss", "train.best_mode": "max",
               "train.max_nonfinite_streak": 3, "train.max_bad_records": 0, "train.async_checkpointing": False,
               "train.checkpoint_ocdbt": False, "train.compilation_cache_dir": "''", "train.keep_executables": False,
               "train.compile_threads": 0,
               "train.profile_steps": 3, "train.profile_skip": 0, "train.eval_batches": 2}
    assert {k.split(".", 1)[1] for k in changed} == set(HOST_ONLY_TRAIN_KEYS)

    def lowered(config):
        program = fit_program(config, cpu_devices)
        return program.train_step.lower(program.abstract_state_with_shardings(),
                                        abstract_batch(program, config.data.global_batch_size, 16000)).as_text()

    base = _config(data_dir)
    moved = _config(data_dir, **changed)
    assert lowered(moved) == lowered(base)
    assert environment_fingerprint(moved) == environment_fingerprint(base)
    other = _config(data_dir, **{"optim.peak_lr": 2e-3})
    assert environment_fingerprint(other) != environment_fingerprint(base)
    assert lowered(other) != lowered(base)


def test_xla_flags_and_jax_settings_enter_the_fingerprint(data_dir, monkeypatch):
    config = _config(data_dir)
    base = environment_fingerprint(config)
    with jax.default_matmul_precision("bfloat16"):  # a thread-local setting changes what is traced
        assert environment_fingerprint(config) != base
    assert environment_fingerprint(config) == base
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert environment_fingerprint(config) != base


def _slow_to_compile(state, batch, scale):
    for i in range(60):  # unrolled: long enough to trace and compile that the next program waits its turn
        state = state * scale + jnp.sin(batch["x"] * (i + 1)).sum()
    return state, batch["x"].sum()


def test_prepared_programs_compile_on_a_background_thread_and_run_as_jit_does(tmp_path):
    jitted = jax.jit(_slow_to_compile, static_argnums=2)
    state, batch = jnp.ones(3), {"x": jnp.arange(4.0)}
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
    executables = StepExecutables(jitted, tmp_path, "fingerprint", pool)
    with _tracing_threads("_slow_to_compile") as threads:
        abstract = jax.ShapeDtypeStruct(state.shape, state.dtype, sharding=state.sharding)
        executables.prepare(abstract, batch, 0.5)  # abstract state: what the loop has before the restore
        executables.prepare(abstract, batch, 0.25)  # queued behind the first: this thread takes it over
        out = executables(state, batch, 0.25)
        np.testing.assert_array_equal(out[0], jitted(state, batch, 0.25)[0])
        out = executables(state, batch, 0.5)
        np.testing.assert_array_equal(out[0], jitted(state, batch, 0.5)[0])
        pool.shutdown()
    # the program prepared first traced on the background thread, the one taken over on this thread (jit's calls
    # above reuse those tracings)
    assert sorted(threads) == ["MainThread", "compile_0"]
    assert executables.compiled == 2 and len(list(tmp_path.iterdir())) == 2


def test_a_program_prepared_under_thread_local_settings_is_compiled_by_the_caller():
    jitted = jax.jit(_slow_to_compile, static_argnums=2)
    state, batch = jnp.ones(3), {"x": jnp.arange(4.0)}
    with _tracing_threads("_slow_to_compile") as threads, concurrent.futures.ThreadPoolExecutor(1) as pool:
        executables = StepExecutables(jitted, None, "", pool)
        with jax.default_matmul_precision("bfloat16"):  # thread-local: the background thread would not see it
            executables.prepare(state, batch, 0.5)
            executables(state, batch, 0.5)
    assert threads == ["MainThread"]


def test_the_compilers_free_memory_is_handed_back_once_before_each_new_program_runs(monkeypatch):
    import xlsr_jax.train.executables as executables_module

    events = []
    monkeypatch.setattr(executables_module, "release_free_memory", lambda: events.append("release"))
    jitted = jax.jit(_slow_to_compile, static_argnums=2)
    executables = StepExecutables(jitted, None, "")
    state, batch = jnp.ones(3), {"x": jnp.arange(4.0)}
    for scale in (0.5, 0.5, 0.25, 0.5, 0.25):
        executables(state, batch, scale)
        events.append(scale)
    assert events == ["release", 0.5, 0.5, "release", 0.25, 0.5, 0.25]
