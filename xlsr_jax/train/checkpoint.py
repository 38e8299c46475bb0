"""Orbax checkpoints of the train state, the data iterator position and the config, saved together.

Saves are asynchronous; Orbax writes into a temporary directory and renames it on commit, so a
torn save (a killed host, a full disk) is never listed as a step and never restored. A full disk
raises `StorageFullError`, a one-line user error that names the last committed step. Restoring
targets the *current* abstract sharded state, so a checkpoint written on one mesh restores onto
another (elastic restore).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp
from etils import epath

from data_pipelines.errors import UserError

log = logging.getLogger(__name__)

# How storage that is out of space shows in the errors Orbax and tensorstore raise (ENOSPC, EDQUOT, and
# EFBIG for a file-size limit): they come as ValueError/OSError text, not as OSError errno.
STORAGE_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "File too large")
# Orbax writes an array that several devices hold (a data-parallel replica) "replica-parallel": each replica
# writes a slice of it. Every slice is a small jitted program, compiled once per shape in each process: 146
# compiles and 10.6 s of the first save's blocking time for the smoke state on 8 devices, for 0.5 MiB of data.
# Below this many bytes per replica's slice one replica writes the whole array; above it (the large kernels and
# their optimizer moments) the write is still spread over the replicas.
MIN_REPLICA_SLICE_BYTES = 1 << 20
_ARRAY_HANDLER = None  # the handler _spread_only_large_arrays registered


def _spread_only_large_arrays() -> None:
    """Make Orbax's jax.Array handler write small replicated arrays from one replica (MIN_REPLICA_SLICE_BYTES).

    Orbax takes this option only through its global type-handler registry; the handler is otherwise Orbax's
    default (the same array-metadata store, so checkpoints are laid out as before)."""
    global _ARRAY_HANDLER
    from orbax.checkpoint._src.metadata import array_metadata_store  # no public name in orbax-checkpoint 0.12

    if ocp.type_handlers.get_type_handler(jax.Array) is _ARRAY_HANDLER:
        return
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
                                             array_metadata_store=array_metadata_store.Store())
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    _ARRAY_HANDLER = handler


class CheckpointMismatchError(UserError):
    """The run's config builds parameters of other shapes than its checkpoint holds."""


class StorageFullError(UserError):
    """A checkpoint could not be written because its storage is full; the committed checkpoints are intact."""


def is_local(path: str | pathlib.Path | epath.Path) -> bool:
    """Whether `path` is on this machine's file system (not gs://, s3://, ...)."""
    return "://" not in str(path)


def _data_args(iterator, save: bool):
    """grain's Orbax handler args for an iterator with get_state/set_state, or None."""
    if iterator is None:
        return None
    import grain

    return grain.checkpoint.CheckpointSave(iterator) if save else grain.checkpoint.CheckpointRestore(iterator)


class Checkpointer:
    """Keeps the last `keep` checkpoints (plus the best by `best_metric` when given) under `directory`."""

    def __init__(self, directory: str | pathlib.Path | epath.Path, keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True, use_ocdbt: bool = True):
        """`directory`: a local path or any path Orbax writes (gs://bucket/run/checkpoints, via etils.epath).

        `use_ocdbt`: tensorstore's OCDBT layout (a few large files per host; the default). Off writes one
        zarr file per chunk, which also works against storage emulators that lack object generations.
        """
        self.directory = epath.Path(directory)
        if is_local(directory):
            self.directory = epath.Path(pathlib.Path(directory).absolute())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            best_fn=(lambda m: float(m[best_metric])) if best_metric else None,
            best_mode=best_mode,
            keep_checkpoints_without_metrics=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        handlers = None
        if not use_ocdbt:  # naming one item's handler means naming every item's
            import grain

            handlers = {"state": ocp.StandardCheckpointHandler(use_ocdbt=False), "config": ocp.JsonCheckpointHandler(),
                        "data": grain.checkpoint.CheckpointHandler()}
        _spread_only_large_arrays()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        """The newest committed step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_iterator=None, config: Mapping | None = None,
             metrics: Mapping[str, float] | None = None, force: bool = False) -> bool:
        """Start an (async) save; every leaf of `state` must be a global jax.Array."""
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        data = _data_args(data_iterator, save=True)
        if data is not None:
            items["data"] = data
        if config is not None:
            items["config"] = ocp.args.JsonSave(json.loads(json.dumps(config, default=str)))
        with self._storage_errors():  # a save first waits for the previous one, whose error surfaces here
            return self._manager.save(step, args=ocp.args.Composite(**items), metrics=dict(metrics or {}) or None,
                                      force=force)

    @contextlib.contextmanager
    def _storage_errors(self):
        """Turn a full disk during a save into one actionable line. Orbax raises it from its writer when the
        next save or wait runs, so which save failed is not known here: the message names the last committed."""
        try:
            yield
        except Exception as e:
            if not any(m in str(e) for m in STORAGE_FULL_MESSAGES):
                raise
            latest = self._manager.latest_step()
            raise StorageFullError(
                f"saving a checkpoint to {self.directory} failed: "
                f"the storage is full ({next(m for m in STORAGE_FULL_MESSAGES if m in str(e))}). "
                + (f"The last committed checkpoint, step {latest}, is intact: free space and rerun the same "
                   "command to resume from it." if latest is not None else
                   "No checkpoint was committed yet: free space and rerun.")
            ) from e

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """State restored onto `abstract_state`'s shardings (a tree of ShapeDtypeStruct with .sharding).

        `data_iterator` (if given) is set to the saved position in place. Returns (step, state).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        self._check_params(step, abstract_state)
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        data = _data_args(data_iterator, save=False)
        if data is not None:
            items["data"] = data
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        log.info("restored step %d from %s", step, self.directory)
        return step, restored["state"]

    def restore_data(self, data_iterator, step: int) -> None:
        """Set `data_iterator` to its position saved at `step`, without reading the train state: the loop
        reads the first batch (and starts compiling its step) before the state is restored."""
        self._manager.restore(step, args=ocp.args.Composite(data=_data_args(data_iterator, save=False)))

    def _check_params(self, step: int, abstract_state) -> None:
        """For a train state (a `.params` field): a config that builds other parameters than the checkpoint
        holds (another model size, head or vocabulary) is a CheckpointMismatchError, found from the
        metadata before any array is read."""
        if not hasattr(abstract_state, "params"):
            return
        with ocp.StandardCheckpointer() as reader:
            saved = reader.metadata(self.directory / str(step) / "state").item_metadata.tree
        problems = shape_differences({"params": saved.get("params", {})}, {"params": abstract_state.params})
        if problems:
            raise CheckpointMismatchError(
                f"the checkpoint of step {step} in {self.directory} holds other parameters than this config builds "
                f"({len(problems)} arrays: " + "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
                + "). The model settings (model.preset, model.overrides, the CTC vocabulary data.vocab) changed "
                "since it was saved: resume with the ones it started with, or train in a new --workdir")

    def read_state(self, step: int | None = None):
        """The saved train state, whole on this host's first device: for inspection and export.

        Works whatever mesh and process count wrote it (the target comes from the checkpoint's own
        metadata; restoring without one fails with "Topology mismatch" on any other topology).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
        path = self.directory / str(step) / "state"
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        with ocp.StandardCheckpointer() as reader:
            tree = reader.metadata(path).item_metadata.tree
            target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
            return reader.restore(path, target)

    def saved_config(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        path = self.directory / str(step) / "config"
        if not path.exists():
            return None
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        with self._storage_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def shape_differences(saved: Any, expected: Any) -> list[str]:
    """What differs between two array trees by key path (e.g. a checkpoint's metadata tree and the
    abstract tree a config builds): arrays missing, extra, or of another shape."""
    def flat(tree):
        return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}

    have, want = flat(saved), flat(expected)
    problems = [f"{k} missing" for k in sorted(set(want) - set(have))]
    problems += [f"{k} not in the model" for k in sorted(set(have) - set(want))]
    return problems + [f"{k} saved {have[k]}, the model has {want[k]}" for k in sorted(set(have) & set(want))
                       if have[k] != want[k]]


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs carrying the target shardings: what `Checkpointer.restore` needs."""
    # optax.MaskedNode (the state of a masked-off or frozen parameter group) holds no array, while
    # flax's sharding tree has a leaf there: keep it as it is.
    return jax.tree_util.tree_map(
        lambda a, s: a if isinstance(a, optax.MaskedNode) else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, shardings, is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
