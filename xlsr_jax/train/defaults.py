"""Config sections every experiment shares (train loop knobs and the mesh), so experiment files
state only what differs."""

from __future__ import annotations

import ml_collections


def train_section(steps: int, eval_every: int, checkpoint_every: int) -> ml_collections.ConfigDict:
    """`config.train`: loop length, logging, evaluation, checkpointing and the non-finite guard."""
    return ml_collections.ConfigDict({
        "steps": steps,
        "seed": 0,
        "accum_steps": 1,
        "log_every": 100,
        "eval_every": eval_every,
        "eval_batches": 20,  # per evaluation; 0: the whole eval split
        "checkpoint_every": checkpoint_every,
        "keep_checkpoints": 3,
        "best_metric": "",  # eval-split metric the best checkpoint (kept beside the last N) is chosen by; "": the task's
        "best_mode": "min",  # for a best_metric given here: "min" or "max"
        "max_nonfinite_streak": 20,
        # Unreadable training records (a corrupt shard) each process skips, logging each one and counting
        # them in the metrics as bad_records, before the run stops; 0: stop at the first.
        "max_bad_records": 10,
        "async_checkpointing": True,
        "checkpoint_ocdbt": True,  # tensorstore's OCDBT layout; False: one file per chunk (see train/checkpoint.py)
        # JAX's persistent compilation cache: "auto" = WORKDIR/compile_cache (local workdirs), a path, or "" (off)
        "compilation_cache_dir": "auto",
        # Keep the compiled train step in COMPILATION_CACHE_DIR/executables, keyed by config, code and devices,
        # so that a restart skips tracing and lowering too (single-process runs; see train/executables.py)
        "keep_executables": True,
        # Threads that compile programs ahead, beside the loop: the first batch's train step while the state is
        # initialized or restored, then every length bucket's, the evaluation's and fine-tuning's full phase's
        # before they are needed; -1: one per 8 host CPUs, 1 to 4; 0: compile each when a step first needs it
        "compile_threads": -1,
        "profile_steps": 0,  # N > 0: a jax.profiler trace of N steps into WORKDIR/profile
        "profile_skip": 2,  # steps after each (re)start before the trace begins (the first ones compile)
    })  # fmt: skip


def mesh_section() -> ml_collections.ConfigDict:
    """`config.mesh`: used when `config.mesh_preset` is "" (-1 fills from the device count; 0 devices = all)."""
    return ml_collections.ConfigDict({"ici": {"data": -1, "fsdp": 1, "tensor": 1},
                                      "dcn": {"data": 1, "fsdp": 1, "tensor": 1}, "num_devices": 0})


def sharding_section() -> ml_collections.ConfigDict:
    """`config.sharding.rules`: logical axis name -> mesh axes ("fsdp", "data,fsdp", or "" for replicated).

    Defaults are `xlsr_jax.parallel.rules.DEFAULT_RULES`; override one entry from the command line,
    e.g. `--config.sharding.rules.conv_out=` (replicate conv kernels) or `--config.sharding.rules.mlp=fsdp`.
    """
    from xlsr_jax.parallel.rules import rules_to_config

    return ml_collections.ConfigDict({"rules": rules_to_config()})
