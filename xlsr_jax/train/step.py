"""The train step: one pure function, jitted once per batch shape with explicit shardings.

`jit_train_step` is the only place it is jitted: `train_and_evaluate` calls what it returns and
`xlsr-jax fit` lowers and compiles the same object for a TPU topology, so the step must not depend
on anything but its arguments (state, batch) and the closed-over static pieces. The step traces
inside `sharding_context(mesh, rules)`, so the model's activation constraints are real wherever it
is compiled (fake CPU devices, a TPU topology, a pod).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from xlsr_jax.parallel.rules import DEFAULT_RULES, Rules, sharding_context
from xlsr_jax.train.state import TrainState


def split_micro_batches(batch: dict, accum_steps: int) -> dict:
    """[B, ...] -> [accum, B / accum, ...] with micro-batch i = rows i, i + accum, i + 2 * accum, ...

    Strided, not contiguous: a device holding rows [j * B/n, (j + 1) * B/n) holds B/(n * accum) rows
    of every micro-batch, so the split moves no data and each micro-batch runs on every device
    (a contiguous split gathers the batch and runs each micro-batch on 1/accum of the devices).
    """

    def split(x):
        y = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        return nn.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))

    return jax.tree_util.tree_map(split, batch)


def make_train_step(model, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    objective: Callable, accum_steps: int = 1, mesh: jax.sharding.Mesh | None = None,
                    rules: Rules = DEFAULT_RULES, param_shardings=None, sum_metrics: tuple[str, ...] = (),
                    frozen_subtree: str = "", frozen_until: int = 0) -> Callable:
    """train_step(state, batch, frozen=False) -> (state, metrics); batch leaves have the global batch first.

    With `mesh`, the step traces inside `sharding_context(mesh, rules)`; with `param_shardings` (the
    params' NamedSharding tree) the gradients are constrained to the parameters' sharding, so FSDP
    reduce-scatters them instead of all-reducing whole gradients. `sum_metrics` are counts, summed
    over micro-batches; the other metrics are averaged weighted by each micro-batch's denominator.

    With `frozen=True` (static: the caller passes `state.step < frozen_until`, known on the host), the
    gradient is taken with respect to every parameter except the top-level subtree `frozen_subtree` (e.g.
    "wav2vec2", the encoder), whose gradient is zero: that program holds no backward pass through it. The
    two phases are two programs, not one `lax.cond` between them: inside the conditional, the full phase
    ran 1.9-2.1x slower on CPU (BENCHMARKS.md, "Fine-tuning's two phases as two programs"). The optimizer must leave those
    parameters and their moments untouched meanwhile (`optim.make_optimizer` with `freeze_encoder_steps`).
    """

    def full_grads(params, batch, step, key):
        def loss_fn(p):
            loss_sum, denom, metrics = objective(model, p, batch, step, key, deterministic=False)
            return loss_sum, (denom, metrics)

        (loss_sum, (denom, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss_sum, denom, metrics, grads

    def partial_grads(params, batch, step, key):
        frozen = params[frozen_subtree]
        rest = {k: v for k, v in params.items() if k != frozen_subtree}

        def loss_fn(r):
            loss_sum, denom, metrics = objective(model, {**r, frozen_subtree: frozen}, batch, step, key,
                                                 deterministic=False)
            return loss_sum, (denom, metrics)

        (loss_sum, (denom, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(rest)
        grads = {**grads, frozen_subtree: jax.tree_util.tree_map(jnp.zeros_like, frozen)}
        return loss_sum, denom, metrics, {k: grads[k] for k in params}

    tx = optax.with_extra_args_support(optimizer)  # the optimizer may read the step (a frozen phase's end)

    def train_step(state: TrainState, batch: dict, frozen: bool = False) -> tuple[TrainState, dict]:
        if frozen and not (frozen_subtree and frozen_until):
            raise ValueError("frozen=True needs a train step made with frozen_subtree and frozen_until")
        if mesh is None:
            return _train_step(state, batch, frozen)
        with sharding_context(mesh, rules):
            return _train_step(state, batch, frozen)

    def constrain_grads(grads):
        if param_shardings is None:
            return grads
        return jax.lax.with_sharding_constraint(grads, param_shardings)

    def _train_step(state: TrainState, batch: dict, frozen: bool) -> tuple[TrainState, dict]:
        grads_of = partial_grads if frozen else full_grads
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if accum_steps == 1:
            loss_sum, denom, metrics, grads = grads_of(state.params, batch, state.step, key)
            grads = constrain_grads(grads)
        else:
            micro = split_micro_batches(batch, accum_steps)

            def body(carry, inputs):
                i, mb = inputs
                ls, d, m, g = grads_of(state.params, mb, state.step, jax.random.fold_in(key, i))
                acc_ls, acc_d, acc_m, acc_g = carry
                acc_m = {k: acc_m[k] + (m[k] if k in sum_metrics else m[k] * d) for k in acc_m}
                acc_g = constrain_grads(jax.tree_util.tree_map(jnp.add, acc_g, g))
                return (acc_ls + ls, acc_d + d, acc_m, acc_g), None

            shapes = jax.eval_shape(lambda: grads_of(state.params, jax.tree_util.tree_map(lambda x: x[0], micro),
                                                     state.step, key))
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
            init = (zeros[0], zeros[1], zeros[2], constrain_grads(zeros[3]))
            (loss_sum, denom, metrics, grads), _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), micro))
            metrics = {k: v if k in sum_metrics else v / jnp.maximum(denom, 1.0) for k, v in metrics.items()}
        denom = jnp.maximum(denom, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(_):
            updates, opt_state = tx.update(grads, state.opt_state, state.params, global_step=state.step)
            return optax.apply_updates(state.params, updates), opt_state

        params, opt_state = jax.lax.cond(finite, apply, lambda _: (state.params, state.opt_state), None)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        )
        out = dict(metrics)
        out.update(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step), finite=finite,
                   skipped=new_state.skipped)
        return new_state, out

    return train_step


def jit_train_step(train_step: Callable, state_shardings, batch_shardings) -> Callable:
    """The one jitted train step `train` calls and `fit` lowers: explicit shardings, the state donated, the
    frozen phase a static third argument (`step(state, batch, True)` is the encoder-frozen program; jit
    takes no keyword arguments beside in_shardings)."""
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=0, static_argnums=2)


def make_eval_step(model, objective: Callable, mesh: jax.sharding.Mesh | None = None,
                   rules: Rules = DEFAULT_RULES) -> Callable:
    """eval_step(params, batch) -> metrics (deterministic: no dropout, argmax codes)."""

    def eval_step(params, batch):
        if mesh is None:
            return _eval_step(params, batch)
        with sharding_context(mesh, rules):
            return _eval_step(params, batch)

    def _eval_step(params, batch):
        loss_sum, denom, metrics = objective(model, params, batch, jnp.zeros([], jnp.int32), None, deterministic=True)
        out = dict(metrics)
        out["loss"] = loss_sum / jnp.maximum(denom, 1.0)
        return out

    return eval_step


def make_predict_step(model, predict: Callable, mesh: jax.sharding.Mesh | None = None,
                      rules: Rules = DEFAULT_RULES) -> Callable:
    """predict_step(params, batch) -> a task's per-row outputs (deterministic), traced in the sharding context."""

    def predict_step(params, batch):
        if mesh is None:
            return predict(model, params, batch)
        with sharding_context(mesh, rules):
            return predict(model, params, batch)

    return predict_step


def jit_predict_step(predict_step: Callable, mesh: jax.sharding.Mesh, rules: Rules, param_shardings,
                     batch_shardings) -> Callable:
    """The predict step jitted with every output's leading axis sharded like the batch rows, so that
    each host reads back only its own rows (`parallel.global_batch.to_host_local`)."""
    from xlsr_jax.parallel.rules import logical_sharding

    return jax.jit(predict_step, in_shardings=(param_shardings, batch_shardings),
                   out_shardings=logical_sharding(("batch",), mesh, rules))
