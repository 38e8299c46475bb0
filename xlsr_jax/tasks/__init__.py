"""Training tasks: the one seam between a head and the generic data pipeline, step, loop and export.

A task module (`pretraining`, `ctc`, `classification`) owns everything task-specific:
- its pipeline targets (grain `random_map` transforms the leaf `data_pipelines` package runs);
- the batch contract: the keys the train step takes and their logical axes (`Task.batch_axes`);
- which metrics are counts (summed over micro-batches, not averaged);
- its model-config adjustment (vocabulary size, labels) and the files an exported model carries;
- its evaluation: per-row predictions on device and an `Evaluator` that turns them into metrics,
  and the metric the best checkpoint is chosen by.

`train/` (step, loop, program, export) only calls what is here; a new task is a new module, an
entry in `TASK_MODULES` and an experiment file.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Protocol

import ml_collections
import numpy as np
from etils import epath

from xlsr_jax.config import ConfigError, Wav2Vec2Config


class Evaluator(Protocol):
    """Accumulates additive statistics on each host; the loop sums `counts()` over hosts, then `result()`."""

    def add(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """One host batch (with `valid` [B] marking real rows) and the task's predictions for its rows."""
        ...

    def counts(self) -> dict[str, float]:
        """Sums over every row added (the same keys on every host)."""
        ...

    def result(self, counts: Mapping[str, float]) -> dict[str, float]:
        """Metrics from counts summed over all hosts."""
        ...


@dataclasses.dataclass
class Task:
    name: str  # the config's `head`
    model_config: Wav2Vec2Config  # adjusted for the task (vocabulary size, labels)
    objective: Callable  # (model, params, batch, step, rng, deterministic) -> (loss_sum, denominator, metrics)
    train_targets: object  # grain random_map transforms: raw padded batch -> step batch
    eval_targets: object
    batch_axes: dict[str, tuple[str | None, ...]]  # the train step's batch keys and their logical axes
    sum_metrics: tuple[str, ...] = ()  # count metrics: summed over micro-batches instead of averaged
    extra_files: tuple[epath.Path, ...] = ()  # copied into exported model directories
    # Full-split evaluation: `predict(model, params, batch) -> {name: [B, ...]}` on device, then
    # `make_evaluator()` on the host. None: the mean of the objective's metrics over eval batches.
    predict: Callable | None = None
    eval_axes: dict[str, tuple[str | None, ...]] = dataclasses.field(default_factory=dict)  # predict's inputs
    make_evaluator: Callable[[], Evaluator] | None = None
    best_metric: tuple[str, str] = ("loss", "min")  # (eval metric, "min" | "max") when train.best_metric is ""

    @property
    def step_keys(self) -> tuple[str, ...]:
        return tuple(self.batch_axes)


def task_module(head: str):
    """The module that implements `head`'s task."""
    from xlsr_jax.tasks import classification, ctc, pretraining

    modules = {"pretraining": pretraining, "ctc": ctc, "sequence_classification": classification}
    if head not in modules:
        raise ConfigError(f"head {head!r} does not train; choose one of {sorted(modules)}")
    return modules[head]


def evaluation_task(head: str, model_config: Wav2Vec2Config, model_dir: pathlib.Path, data_dir: pathlib.Path,
                    split: str, lowercase: bool | None = None) -> Task:
    """The evaluation-only task of a `head` model directory on `split` of a prepared data set
    (`xlsr-jax evaluate`); `lowercase` applies to CTC references (None: decided by the vocabulary)."""
    from xlsr_jax.tasks import classification, ctc

    builders = {
        "ctc": lambda: ctc.evaluation_task(model_config, model_dir, data_dir, lowercase),
        "sequence_classification": lambda: classification.evaluation_task(model_config, data_dir, split),
    }
    if head not in builders:
        raise ConfigError(f"{model_dir} has a {head!r} head, which makes no predictions to score; "
                          f"give a model directory with one of the heads {sorted(builders)}")
    return builders[head]()


def make_task(config: ml_collections.ConfigDict, model_config: Wav2Vec2Config, data_dir: pathlib.Path | None,
              workdir: epath.Path | None) -> Task:
    """The task `config.head` trains. Without `data_dir`/`workdir` (e.g. `xlsr-jax fit`), data-derived
    sizes (vocabulary, label set) are stand-ins of a typical size or come from the config."""
    return task_module(config.head).make(config, model_config, data_dir, workdir)


def exported_model(config: ml_collections.ConfigDict, model_config: Wav2Vec2Config,
                   workdir: epath.Path) -> tuple[Wav2Vec2Config, tuple[epath.Path, ...]]:
    """(model config, files to copy) for exporting a run's checkpoint: the task's sizes and artifacts."""
    return task_module(config.head).exported_model(config, model_config, epath.Path(workdir))
