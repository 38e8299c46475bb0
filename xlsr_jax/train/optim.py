"""Optimizer and learning-rate schedules (fairseq's polynomial decay and tri-stage, cosine).

AdamW with decoupled weight decay masked off biases, norm scales and the weight-norm magnitude
(or on every parameter, as fairseq's Adam does: `decay_all_params`); global-norm clipping
(`clip_norm` 0: none, fairseq's default); the conv feature encoder can be frozen for good and the whole encoder until
a step (no update, no weight decay, no moments advanced).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from xlsr_jax.config import ConfigError

_NO_DECAY_LEAVES = ("bias", "scale", "weight_g")


def polynomial_decay(peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0,
                     power: float = 1.0) -> optax.Schedule:
    """fairseq `polynomial_decay`: linear warmup from 0, then (peak-end)*(1-progress)^power + end."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak_lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        decay = (peak_lr - end_lr) * (1.0 - progress) ** power + end_lr
        return jnp.where(step < warmup_steps, warm, decay)

    return schedule


def tri_stage(peak_lr: float, total_steps: int, phase_ratio=(0.1, 0.4, 0.5), init_lr_scale: float = 0.01,
              final_lr_scale: float = 0.05) -> optax.Schedule:
    """fairseq `tri_stage`: linear warmup from init_lr_scale*peak, hold, exponential decay to final_lr_scale*peak."""
    warmup, hold, decay = (int(r * total_steps) for r in phase_ratio)
    init_lr, final_lr = init_lr_scale * peak_lr, final_lr_scale * peak_lr
    decay_factor = -jnp.log(final_lr_scale) / max(decay, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = init_lr + (peak_lr - init_lr) * step / max(warmup, 1)
        down = peak_lr * jnp.exp(-decay_factor * (step - warmup - hold))
        lr = jnp.where(step < warmup, warm, jnp.where(step < warmup + hold, peak_lr, down))
        return jnp.where(step >= warmup + hold + decay, final_lr, lr)

    return schedule


def cosine(peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, max(warmup_steps, 1), max(total_steps, 2), end_lr)


def check_optim(cfg: Mapping) -> None:
    """Raise ConfigError naming every `optim` value that cannot train."""
    problems = []
    if not cfg.get("peak_lr", 0) > 0:
        problems.append(f"optim.peak_lr must be > 0, got {cfg.get('peak_lr')}")
    if cfg.get("total_steps", 1) < 1 or cfg.get("warmup_steps", 0) < 0:
        problems.append(f"need optim.total_steps >= 1 and optim.warmup_steps >= 0, got {cfg.get('total_steps')}, "
                        f"{cfg.get('warmup_steps')}")
    for key in ("b1", "b2"):
        if not 0 <= cfg.get(key, 0.9) < 1:
            problems.append(f"optim.{key} must be in [0, 1), got {cfg.get(key)}")
    for key in ("eps", "weight_decay", "clip_norm", "end_lr"):
        if cfg.get(key, 0) < 0:
            problems.append(f"optim.{key} must be >= 0, got {cfg.get(key)}")
    if problems:
        raise ConfigError("; ".join(problems))


def make_schedule(cfg: Mapping) -> optax.Schedule:
    """A schedule from `optim` config fields (schedule, peak_lr, warmup_steps, total_steps, ...)."""
    check_optim(cfg)
    name = cfg["schedule"]
    if name == "polynomial":
        return polynomial_decay(cfg["peak_lr"], cfg["warmup_steps"], cfg["total_steps"], cfg.get("end_lr", 0.0),
                                cfg.get("power", 1.0))
    if name == "tri_stage":
        return tri_stage(cfg["peak_lr"], cfg["total_steps"], tuple(cfg.get("phase_ratio", (0.1, 0.4, 0.5))),
                         cfg.get("init_lr_scale", 0.01), cfg.get("final_lr_scale", 0.05))
    if name == "cosine":
        return cosine(cfg["peak_lr"], cfg["warmup_steps"], cfg["total_steps"], cfg.get("end_lr", 0.0))
    raise ConfigError(f"unknown optim.schedule {name!r}; choose polynomial, tri_stage or cosine")


def _path_names(path) -> tuple[str, ...]:
    # Dict keys only: logical-partitioning boxes add a `.value` attribute step to boxed leaves' paths.
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def decay_mask(params) -> dict:
    """True where weight decay applies: every weight except biases, norm scales and weight-norm g."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _path_names(p)[-1] not in _NO_DECAY_LEAVES, params)


ENCODER = "wav2vec2"  # every head keeps the encoder under this name (models/heads.py)


def param_groups(params, freeze_feature_encoder: bool, encoder_frozen_phase: bool) -> dict:
    """Label per leaf: "frozen" (the conv feature encoder, when frozen), "encoder" (the rest of the
    encoder, when it has a frozen phase) or "trainable"."""

    def label(path, _):
        names = _path_names(path)
        if freeze_feature_encoder and names[:2] == (ENCODER, "feature_extractor"):
            return "frozen"
        if encoder_frozen_phase and names[:1] == (ENCODER,):
            return "encoder"
        return "trainable"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: Mapping) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) from the `optim` config section.

    `freeze_feature_encoder`: the conv feature encoder is never updated and has no Adam moments.
    `freeze_encoder_steps` = N (fairseq's freeze_finetune_updates): the encoder's AdamW starts at
    step N with fresh moments and its own bias correction, as fairseq's lazily created Adam state
    does, on the global learning-rate schedule; before N its gradients are zero (the train step
    computes none: `step.make_train_step(frozen_subtree=ENCODER, frozen_until=N)`) and its state
    does not move. The optimizer reads the step from `update(..., global_step=state.step)`.
    """
    schedule = make_schedule(cfg)

    def adamw(lr):
        return optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.98), eps=cfg.get("eps", 1e-6),
                           weight_decay=cfg.get("weight_decay", 0.01),
                           mask=None if cfg.get("decay_all_params", False) else decay_mask)

    frozen_steps = int(cfg.get("freeze_encoder_steps", 0) or 0)
    freeze_features = bool(cfg.get("freeze_feature_encoder", False))
    if not frozen_steps and not freeze_features:
        tx = adamw(schedule)
    else:
        transforms = {"trainable": adamw(schedule), "frozen": optax.set_to_zero()}
        if frozen_steps:
            # The inner AdamW counts only the updates it applies: its count 0 is global step N.
            late = adamw(lambda count: schedule(count + frozen_steps))
            transforms["encoder"] = optax.transforms.conditionally_mask(
                late, lambda count, global_step: global_step >= frozen_steps, forward_extra_args=True)
        tx = optax.multi_transform(
            transforms, lambda params: param_groups(params, freeze_features, bool(frozen_steps)))
    chain = [optax.clip_by_global_norm(cfg["clip_norm"])] if cfg.get("clip_norm") else []
    return optax.chain(*chain, tx), schedule
