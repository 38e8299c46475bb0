"""The train state and its creation directly in sharded form (no full copy on any host)."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from xlsr_jax.parallel.rules import DEFAULT_RULES, Rules


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied (skipped steps included)
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data (checkpointable); the step number is folded in each step
    skipped: jax.Array  # int32: steps skipped for a non-finite loss or gradient, in total
    nonfinite_streak: jax.Array  # int32: consecutive skipped steps (the loop stops at a limit)


def _init_fn(model: nn.Module, optimizer: optax.GradientTransformation, sample_shape: tuple[int, int], seed: int):
    def init():
        params_key, state_key = jax.random.split(jax.random.key(seed))
        variables = model.init(params_key, jnp.zeros(sample_shape, jnp.float32))
        params = variables["params"]
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            # init on the boxed params: Adam moments inherit the parameters' logical axis names
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(state_key),
            skipped=jnp.zeros([], jnp.int32),
            nonfinite_streak=jnp.zeros([], jnp.int32),
        )

    return init


def state_shardings(model, optimizer, mesh, rules: Rules = DEFAULT_RULES, seed: int = 0,
                    sample_shape=(1, 16000)):
    """(abstract unboxed state, NamedSharding tree) from `jax.eval_shape`: nothing is allocated."""
    init = _init_fn(model, optimizer, sample_shape, seed)
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init)
        specs = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    abstract = nn.meta.unbox(boxed)
    return abstract, shardings


def create_train_state(model, optimizer, mesh, rules: Rules = DEFAULT_RULES, seed: int = 0,
                       sample_shape=(1, 16000), shardings=None) -> tuple[TrainState, TrainState]:
    """(state, shardings): params and optimizer state initialized already sharded over `mesh`.

    `shardings`: the state's NamedSharding tree when the caller has it (saves a second `eval_shape`).
    """
    if shardings is None:
        _, shardings = state_shardings(model, optimizer, mesh, rules, seed, sample_shape)
    init = _init_fn(model, optimizer, sample_shape, seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()
    return state, shardings
