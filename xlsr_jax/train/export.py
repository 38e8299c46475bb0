"""Export the parameters of a training checkpoint as a model directory (the format `convert` reads)."""

from __future__ import annotations

import pathlib

import ml_collections
from etils import epath

from xlsr_jax.model_dir import save_model_dir
from xlsr_jax.tasks import exported_model
from xlsr_jax.train.checkpoint import Checkpointer


def export_checkpoint(workdir: str | pathlib.Path, output: str | pathlib.Path, step: int | None = None,
                      overwrite: bool = False) -> pathlib.Path:
    """Write MODEL_DIR from the checkpoint at `step` (default: newest) of a run in `workdir` (local or gs://).

    An existing `output` is refused unless `overwrite`.
    """
    from xlsr_jax.train.loop import model_config_from

    checkpointer = Checkpointer(epath.Path(workdir) / "checkpoints", async_save=False)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no committed checkpoint under {workdir}/checkpoints")
    saved = checkpointer.saved_config(step)
    if saved is None:
        raise FileNotFoundError(f"checkpoint {step} in {workdir} has no saved config")
    config = ml_collections.ConfigDict(saved)
    # Checkpoints hold float32 params; the exported config keeps the run's numerics (dtype, remat).
    params = checkpointer.read_state(step)["params"]
    checkpointer.close()
    # The task's data-derived sizes (vocabulary, labels) and the files that travel with the model.
    model_config, extra = exported_model(config, model_config_from(config, workdir), epath.Path(workdir))
    return save_model_dir(output, model_config, params, config.head, extra_files=extra, overwrite=overwrite)
