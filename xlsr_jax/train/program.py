"""The compiled pieces of a run, built once from (config, mesh, task): what `train` runs and `fit` compiles.

`build_program` is the single place the model, optimizer, rules, state shardings and the jitted
train/eval steps are put together. `train_and_evaluate` feeds real batches to `program.train_step`;
`xlsr-jax fit` calls `program.train_step.lower(program.abstract_state_with_shardings(),
abstract_batch(...))` for a TPU topology, so the two can never drift apart.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np
import optax

from xlsr_jax.config import ConfigError, Wav2Vec2Config
from xlsr_jax.models.heads import build_model, count_params
from xlsr_jax.parallel.mesh import validate_for_model
from xlsr_jax.parallel.rules import Rules, logical_sharding, rules_from_config
from xlsr_jax.train.checkpoint import abstract_with_shardings
from xlsr_jax.train.optim import ENCODER, make_optimizer
from xlsr_jax.train.state import state_shardings
from xlsr_jax.train.step import jit_predict_step, jit_train_step, make_eval_step, make_predict_step, make_train_step
from xlsr_jax.tasks import Task


@dataclasses.dataclass
class TrainProgram:
    model_config: Wav2Vec2Config
    model: object
    task: Task
    mesh: jax.sharding.Mesh
    rules: Rules
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: object  # unboxed TrainState of ShapeDtypeStructs
    state_shardings: object  # NamedSharding tree matching abstract_state
    batch_shardings: dict[str, jax.sharding.NamedSharding]
    num_params: int
    accum_steps: int
    train_step: object  # jitted (state, batch, frozen=False) -> (state, metrics)
    eval_step: object  # jitted (params, batch) -> metrics
    predict_step: object | None  # jitted (params, batch) -> per-row outputs sharded like the batch (task.predict)
    frozen_until: int = 0  # steps before this one run train_step(..., frozen=True): the encoder gets no gradient

    def abstract_state_with_shardings(self):
        """The state as ShapeDtypeStructs carrying their shardings (restore targets, AOT lowering)."""
        return abstract_with_shardings(self.abstract_state, self.state_shardings)


def rules_of(config: ml_collections.ConfigDict) -> Rules:
    """The run's logical-axis rules (`config.sharding.rules`, DEFAULT_RULES where the config has none)."""
    section = config.get("sharding", None)
    return rules_from_config(dict(section.rules) if section is not None and "rules" in section else {})


def validate_batch(mesh: jax.sharding.Mesh, global_batch: int, accum_steps: int) -> None:
    """The global batch must split into `accum_steps` micro-batches that each divide over the batch shards."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if accum_steps < 1:
        raise ConfigError(f"train.accum_steps must be >= 1, got {accum_steps}")
    if global_batch % (accum_steps * shards):
        raise ConfigError(f"global batch {global_batch} does not split into {accum_steps} micro-batches over "
                          f"data*fsdp={shards} devices: make it a multiple of {accum_steps * shards}")


def build_program(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, task: Task) -> TrainProgram:
    """Model, optimizer, sharded abstract state and the jitted steps for `config` on `mesh`."""
    model_config = task.model_config
    rules = rules_of(config)
    accum = int(config.train.get("accum_steps", 1))
    validate_for_model(mesh, model_config, config.data.global_batch_size)
    # With audio-budget batches (data.max_tokens) the pipeline sizes training batches in multiples of
    # data*fsdp*accum itself; global_batch_size is then only the evaluation batch.
    budget = bool(config.data.get("max_tokens", 0))
    validate_batch(mesh, config.data.global_batch_size, 1 if budget else accum)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    groups = getattr(task.objective, "perplexity_groups", 1)
    if groups == -1:  # one per batch shard (fairseq: per GPU)
        groups = shards
        task = dataclasses.replace(task, objective=task.objective.replace(perplexity_groups=groups))
    # Micro-batch rows: a multiple of the shards with audio-budget batches, else the global batch / accum.
    micro = shards if budget else config.data.global_batch_size // accum
    if groups < 1 or micro % groups or config.data.global_batch_size % groups:
        raise ConfigError(f"objective.perplexity_groups={groups} must divide the rows of every micro-batch "
                          f"({micro}) and of the evaluation batch ({config.data.global_batch_size})")
    model = build_model(model_config, config.head)
    optimizer, schedule = make_optimizer(config.optim)
    abstract, shardings = state_shardings(model, optimizer, mesh, rules, seed=config.train.seed)
    batch_shardings = {k: logical_sharding(axes, mesh, rules) for k, axes in task.batch_axes.items()}
    frozen_until = int(config.optim.get("freeze_encoder_steps", 0) or 0)
    step = make_train_step(model, optimizer, schedule, task.objective, accum_steps=accum, mesh=mesh, rules=rules,
                           param_shardings=shardings.params, sum_metrics=task.sum_metrics,
                           frozen_subtree=ENCODER if frozen_until else "", frozen_until=frozen_until)
    eval_step = make_eval_step(model, task.objective, mesh=mesh, rules=rules)
    predict_step = None
    if task.predict is not None:
        predict_step = jit_predict_step(make_predict_step(model, task.predict, mesh, rules), mesh, rules,
                                        shardings.params, {k: logical_sharding(a, mesh, rules)
                                                           for k, a in task.eval_axes.items()})
    return TrainProgram(
        model_config=model_config, model=model, task=task, mesh=mesh, rules=rules, optimizer=optimizer,
        schedule=schedule, abstract_state=abstract, state_shardings=shardings, batch_shardings=batch_shardings,
        num_params=count_params(abstract.params), accum_steps=accum,
        train_step=jit_train_step(step, shardings, batch_shardings),
        eval_step=jax.jit(eval_step),  # eval batches may lack training-only keys (e.g. SpecAugment masks)
        predict_step=predict_step, frozen_until=frozen_until,
    )  # fmt: skip


def abstract_batch(program: TrainProgram, global_batch: int, num_samples: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's batch at [global_batch, num_samples] as ShapeDtypeStructs with their shardings.

    Shapes and dtypes come from running the task's own pipeline targets on one fake row, so they are
    exactly what the input pipeline feeds `train`.
    """
    row = _fake_row(program.task.train_targets, num_samples)
    return {k: _rows(row[k], global_batch, program.batch_shardings[k]) for k in program.task.step_keys}


def abstract_eval_batch(program: TrainProgram, global_batch: int, num_samples: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch `evaluate` feeds the task's evaluation program (`predict_step`, or else `eval_step`) at
    [global_batch, num_samples], as `abstract_batch` makes the train step's."""
    task = program.task
    row = _fake_row(task.eval_targets, num_samples)
    if program.predict_step is not None:
        return {k: _rows(row[k], global_batch, logical_sharding(axes, program.mesh, program.rules))
                for k, axes in task.eval_axes.items()}
    return {k: _rows(row[k], global_batch, program.batch_shardings[k]) for k in task.step_keys if k in row}


def _fake_row(targets, num_samples: int) -> dict:
    raw = {
        "input_values": np.zeros((1, num_samples), np.float32),
        "attention_mask": np.ones((1, num_samples), np.int32),
        "lengths": np.asarray([num_samples], np.int64),
        "texts": ["a"],
        "language_id": np.zeros((1,), np.int32),
        "positions": np.zeros((1,), np.int64),
    }
    return targets(raw, np.random.default_rng(0))


def _rows(value, global_batch: int, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((global_batch, *np.shape(value)[1:]), np.asarray(value).dtype, sharding=sharding)
