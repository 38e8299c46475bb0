"""Evaluation over a whole split: the task's predictions on device, its evaluator on each host, counts summed.

Used by the training loop (every `train.eval_every` steps) and by `xlsr-jax evaluate` on a model
directory, so a run's logged WER and the command's WER are the same computation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np

from data_pipelines.pipeline import PipelineConfig, prepared_eval_dataset
from xlsr_jax.parallel.global_batch import to_global_batch, to_host_local
from xlsr_jax.parallel.rules import Rules
from xlsr_jax.tasks import Evaluator, Task

log = logging.getLogger(__name__)


def sum_over_hosts(counts: Mapping[str, float]) -> dict[str, float]:
    """Counts summed over every JAX process (each host evaluated its own rows)."""
    keys = sorted(counts)
    values = np.asarray([counts[k] for k in keys], np.float64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        values = np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), -1).sum(0)
    return dict(zip(keys, values.tolist()))


def evaluate_split(task: Task, predict_step: Callable, params, data_dir, split: str, config: PipelineConfig,
                   mesh: jax.sharding.Mesh, rules: Rules, max_batches: int = 0,
                   evaluator: Evaluator | None = None) -> tuple[dict[str, float], Evaluator, dict[str, float]]:
    """(metrics, evaluator, summed counts) of `task` on every record of `split` (or its first `max_batches` batches).

    `config.batch_size` is this host's rows per batch; every host runs the same number of batches.
    """
    evaluator = evaluator or task.make_evaluator()
    ds = prepared_eval_dataset(data_dir, split, config, task.eval_targets)
    start, rows = time.perf_counter(), 0
    for i, host_batch in enumerate(ds):
        if max_batches and i >= max_batches:
            break
        batch = to_global_batch({k: host_batch[k] for k in task.eval_axes}, mesh, rules, task.eval_axes)
        outputs = to_host_local(predict_step(params, batch), mesh, rules)
        evaluator.add(host_batch, outputs)
        rows += int(np.sum(host_batch["valid"]))
    counts = sum_over_hosts(evaluator.counts())
    log.info("evaluated %d utterances of %r on this host in %.1f s", rows, split, time.perf_counter() - start)
    return evaluator.result(counts), evaluator, counts
