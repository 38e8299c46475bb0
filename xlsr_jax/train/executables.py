"""Compiled train steps kept between runs, so that a restarted job neither traces, lowers nor compiles.

JAX's persistent compilation cache (on by default, `train.compilation_cache_dir`) saves the compile,
but finding an entry needs the program's HLO: a restart still traces and lowers the step (2-3 s for the
smoke step on the CI machine, the most of what remains of a restart). This cache keys the compiled
executable by everything the traced program is made of, known without tracing:

- the run's config, less the `train` keys only the host loop reads (`HOST_ONLY_TRAIN_KEYS`: run length,
  logging, checkpointing, profiling), so that extending a run or logging more often still finds its step.
  `tests/test_executables.py` lowers the step with all of them changed and checks the program is the same;
- the source of `xlsr_jax` and `data_pipelines`, and the versions of jax, jaxlib, flax, optax, numpy and
  the backend's platform version;
- every jax config value, XLA_FLAGS and LIBTPU_INIT_ARGS;
- the devices (ids, kinds, processes) and, per call, the shapes, dtypes and shardings of the arguments.

The entry is `jax.experimental.serialize_executable`'s payload, written atomically, of a step compiled
in this process (not one JAX's persistent cache loaded: jaxlib 0.10.2 serializes those without some of
their kernels). One that fails to load (another jaxlib, a torn file) is logged, removed and compiled
again. Single-process runs only: the processes of a multi-process job would have to agree on hit or miss
before the first collective.

Programs can also be got ahead, on background threads (`StepExecutables.prepare`, every process alike):
compiling is host work, so it can overlap the state's restore or init and the device's steps. A program is
traced on the background thread only under the JAX settings the caller's thread has; one asked for under
a thread-local context (e.g. `with jax.default_matmul_precision(...)`) is traced on the caller's thread.
Before a program first runs, the free memory the compiler left in the C heap goes back to the system
(`xlsr_jax.host_memory.release_free_memory`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import pickle
import threading
import time
from collections.abc import Callable

import jax
from etils import epath

from xlsr_jax.host_memory import release_free_memory

log = logging.getLogger(__name__)

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml-collections")
HOST_ONLY_TRAIN_KEYS = (
    "steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "best_metric", "best_mode",
    "max_nonfinite_streak", "max_bad_records", "async_checkpointing", "checkpoint_ocdbt",
    "compilation_cache_dir", "keep_executables", "compile_threads", "profile_steps", "profile_skip", "eval_batches",
)  # fmt: skip
_SOURCE_ROOTS = ("xlsr_jax", "data_pipelines")


def _source_digest() -> str:
    digest = hashlib.sha256()
    for root in _SOURCE_ROOTS:
        package = pathlib.Path(__import__(root).__file__).parent
        for path in sorted(package.rglob("*.py")):
            digest.update(str(path.relative_to(package.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def program_config_json(config) -> str:
    """The run's config (an ml_collections ConfigDict) as JSON, less `HOST_ONLY_TRAIN_KEYS`."""
    data = json.loads(config.to_json_best_effort(sort_keys=True))
    for key in HOST_ONLY_TRAIN_KEYS:
        data.get("train", {}).pop(key, None)
    return json.dumps(data, sort_keys=True)


def fingerprint_parts(config) -> dict:
    """What a traced step is made of, besides its arguments: config, code, versions, flags, devices."""
    return {
        "config": program_config_json(config),
        "source": _source_digest(),
        "versions": {p: _version(p) for p in _PACKAGES},
        "platform": [jax.devices()[0].platform, jax.devices()[0].client.platform_version],
        "jax_config": {k: repr(v) for k, v in sorted(jax.config.values.items())},
        "env": {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")},
        "devices": [(d.id, d.process_index, d.platform, d.device_kind) for d in jax.devices()],
        "process": [jax.process_index(), jax.process_count()],
    }


def environment_fingerprint(config) -> str:
    """A digest of `fingerprint_parts(config)`."""
    return hashlib.sha256(json.dumps(fingerprint_parts(config), sort_keys=True, default=str).encode()).hexdigest()


def _signature(args) -> str:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return repr(treedef) + "".join(
        f"|{getattr(x, 'shape', None)}{getattr(x, 'dtype', None)}{getattr(x, 'sharding', None)}" for x in leaves)


def _jax_settings() -> str:
    """JAX's config as this thread sees it (thread-local contexts included): what tracing reads."""
    return repr(sorted(jax.config.values.items()))


def _abstract(args):
    """ShapeDtypeStructs of `args` (arrays or ShapeDtypeStructs): what the signature holds, nothing else."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jax.dtypes.canonicalize_dtype(x.dtype), sharding=x.sharding,
                                       weak_type=getattr(x, "weak_type", False)),
        args)


def _batch_key(batch) -> tuple:
    """The same for a batch of arrays and its ShapeDtypeStructs (whose dtypes jax has not canonicalized)."""
    return tuple((k, tuple(v.shape), str(jax.dtypes.canonicalize_dtype(v.dtype))) for k, v in sorted(batch.items()))


class StepExecutables:
    """Runs a jitted `(state, batch, *static)` step through executables compiled once, kept in `directory`.

    `directory` None keeps nothing between runs (each batch shape is still compiled once, as jit does).
    `prepare` starts getting a program (loading or compiling it) on `pool`, a thread pool the caller owns
    and shuts down, so that its compile overlaps what the caller does meanwhile: initializing or restoring
    the state, or running the steps of another program. A call that needs a program not started yet gets
    it on the caller's thread; one being compiled is waited for. `name` is what the log calls the step.
    Counts what it did in `loaded` and `compiled`.
    """

    def __init__(self, jitted: Callable, directory: str | epath.Path | None, fingerprint: str,
                 pool: concurrent.futures.Executor | None = None, name: str = "train step"):
        self._jitted = jitted
        self._directory = epath.Path(directory) if directory else None
        self._fingerprint = fingerprint
        self._pool = pool
        self._name = name
        self._ready: dict[tuple, Callable] = {}
        self._programs: dict[tuple, concurrent.futures.Future | None] = {}
        self._lock = threading.Lock()
        self.loaded = 0
        self.compiled = 0

    def prepare(self, state, batch, *static) -> None:
        """Start getting the program for these arguments (arrays or ShapeDtypeStructs) on the pool;
        nothing if it is known already, or without a pool."""
        key = (_batch_key(batch), static)
        with self._lock:
            if self._pool is None or key in self._programs:
                return
            self._programs[key] = self._pool.submit(self._background, _abstract((state, batch)), static,
                                                    _jax_settings())

    def __call__(self, state, batch, *static):
        """`static`: the jitted step's static arguments after (state, batch); each value is its own program."""
        key = (_batch_key(batch), static)
        step = self._ready.get(key)
        if step is None:
            step = self._ready[key] = self._program(key, state, batch, static)
            release_free_memory()  # what the compiler freed, before the program's first run adds its own peak
        return step(state, batch)

    def _program(self, key: tuple, state, batch, static: tuple) -> Callable:
        with self._lock:
            future = self._programs.get(key)
            if future is not None and future.cancel():  # not started yet: get it on this thread, now
                future = None
            self._programs[key] = future  # None: got on the caller's thread
        if future is not None:
            if not future.done():
                start = time.perf_counter()
                concurrent.futures.wait([future])
                log.info("waited %.1f s for the %s being compiled in the background", time.perf_counter() - start,
                         self._name)
            if future.result() is not None:
                return future.result()
        return self._executable(_abstract((state, batch)), static)

    def _background(self, abstract, static: tuple, settings: str) -> Callable | None:
        """The program, or None where the caller traces under other JAX settings than this thread has."""
        if _jax_settings() != settings:  # a thread-local context (e.g. jax.default_matmul_precision) in the caller
            log.info("the caller's thread has its own JAX settings: its %s is compiled there, when needed", self._name)
            return None
        try:
            return self._executable(abstract, static)
        except Exception as e:  # raised again to the step that needs the program; logged for one that never does
            log.warning("compiling the %s in the background failed (%s: %s)", self._name, type(e).__name__,
                        str(e)[:200])
            raise

    def _path(self, state, batch, static: tuple) -> epath.Path | None:
        if self._directory is None:
            return None
        signature = _signature((state, batch)) + repr(static)
        digest = hashlib.sha256((self._fingerprint + signature).encode()).hexdigest()[:40]
        return self._directory / f"train_step-{digest}.pkl"

    def _executable(self, abstract: tuple, static: tuple) -> Callable:
        """Load the program for `abstract` (state, batch) and `static`, or compile it (and keep it)."""
        from jax.experimental import serialize_executable

        path = self._path(*abstract, static)
        if path is not None and path.exists():
            start = time.perf_counter()
            try:
                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                step = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
            except Exception as e:  # another jaxlib, a torn or foreign file: compile instead
                log.warning("could not load the compiled train step %s (%s: %s); compiling it again",
                            path, type(e).__name__, str(e)[:200])
                path.unlink(missing_ok=True)
            else:
                with self._lock:
                    self.loaded += 1
                log.info("loaded the compiled train step from %s in %.2f s", path, time.perf_counter() - start)
                return step
        cache_hits, thread = [], threading.get_ident()

        def on_event(event, **kwargs):  # JAX records the event on the compiling thread; others compile too
            if event == "/jax/compilation_cache/cache_hits" and threading.get_ident() == thread:
                cache_hits.append(event)

        jax.monitoring.register_event_listener(on_event)
        start = time.perf_counter()
        try:
            compiled = self._jitted.lower(*abstract, *static).compile()
        finally:
            jax.monitoring.unregister_event_listener(on_event)
        with self._lock:  # the pool's threads count here too
            self.compiled += 1
        log.info("compiled the %s for batch shapes %s, static arguments %s, in %.1f s on %s", self._name,
                 {k: list(v.shape) for k, v in sorted(abstract[1].items())}, list(static),
                 time.perf_counter() - start, threading.current_thread().name)
        if cache_hits:
            # jaxlib 0.10.2 serializes an executable that JAX's persistent cache loaded without some of its
            # kernels ("Function ... not found" when the copy runs): keep only what was compiled here.
            log.info("the train step came from JAX's compilation cache: not kept in %s", self._directory)
        elif path is not None:
            try:
                data = pickle.dumps(serialize_executable.serialize(compiled))
                self._directory.mkdir(parents=True, exist_ok=True)
                partial = path.parent / f"{path.name}.partial-{os.getpid()}"
                partial.write_bytes(data)
                partial.rename(path)
            except Exception as e:  # e.g. a backend that cannot serialize: run without keeping it
                log.warning("could not keep the compiled train step in %s (%s: %s)", path, type(e).__name__,
                            str(e)[:200])
        return compiled
