"""`train_and_evaluate(config, workdir)`: the training loop every entry point calls.

Resumes from the newest committed checkpoint in `workdir` without being asked (train state and
data position); SIGTERM (preemption) saves and exits cleanly; K non-finite steps in a row stop
the job with the last good checkpoint intact.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
import pathlib
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from data_pipelines.errors import UserError
from data_pipelines.pipeline import PipelineConfig, batch_shapes, eval_batch_shapes, prepared_dataset
from data_pipelines.records import DatasetIndex
from data_pipelines.sources import PreparedSource
from xlsr_jax.parallel.global_batch import to_global_batch
from xlsr_jax.config import ConfigError, get_preset
from xlsr_jax.models.heads import abstract_params
from xlsr_jax.parallel.distributed import describe_job
from xlsr_jax.parallel.mesh import build_run_mesh, validate_for_model
from xlsr_jax.parallel.rules import Rules, param_shardings
from xlsr_jax.train.checkpoint import Checkpointer, is_local
from xlsr_jax.train.executables import StepExecutables, environment_fingerprint
from xlsr_jax.train.metrics import MetricsWriter, device_peak_flops, train_flops_per_step
from xlsr_jax.train.program import abstract_batch, abstract_eval_batch, build_program
from xlsr_jax.train.state import create_train_state
from xlsr_jax.tasks import make_task
from xlsr_jax.train.evaluation import evaluate_split

log = logging.getLogger(__name__)



class TrainingError(UserError):
    """The run cannot continue (e.g. repeated non-finite losses); the last good checkpoint is kept."""


@dataclasses.dataclass
class RunResult:
    step: int
    preempted: bool
    history: list[dict]  # logged train metrics
    eval_history: list[dict]
    state: object = None  # the final TrainState (sharded jax.Arrays)


class _Preemption:
    """SIGTERM (preemption, maintenance) -> every host saves at the same step and stops; no per-step cost.

    One process: a Python SIGTERM handler sets a flag the loop reads between steps. Several
    processes: JAX's preemption sync point (`jax.distributed` catches SIGTERM on any host and the
    coordination service picks the step every host stops at), read on the host each step without
    touching the device. Where the preemption service is disabled, the hosts agree on the flag only
    at log and checkpoint steps (a small all-gather where they synchronize anyway).
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._sync_point = jax.process_count() > 1

    def __enter__(self):
        if not self._sync_point:
            self._install()
        return self

    def _install(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread (e.g. a test runner thread): no handler
            self._previous = None

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self.requested = True

    def should_stop(self, step: int, hosts_in_step: bool) -> bool:
        """Whether every host stops after `step`; `hosts_in_step`: a log/checkpoint step (fallback agreement)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        if self._sync_point:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # jax_enable_preemption_service is off: agree on our own flag instead
                log.warning("JAX's preemption service is disabled; SIGTERM is acted on at log/checkpoint steps")
                self._sync_point = False
                self._install()
        if not hosts_in_step:
            return False
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.max(flags))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _CompilationCache:
    """JAX's persistent compilation cache in `train.compilation_cache_dir` ("auto": WORKDIR/compile_cache
    for a local workdir, none for a bucket one: name a directory, local or gs://, to share one; "": off)
    for the length of a run, so that a restarted job (preemption, crash) loads its compiled
    steps instead of compiling them again, as MaxText does. A cache the process already has (e.g.
    JAX_COMPILATION_CACHE_DIR) is kept. Off for multi-process CPU runs, where each process keys the same
    program differently and only process 0 writes, so the processes could run different executables."""

    def __init__(self, workdir: epath.Path, train_config):
        setting = train_config.get("compilation_cache_dir", "auto")
        if setting == "auto":
            setting = str(workdir / "compile_cache") if is_local(workdir) else ""
        self.directory = setting
        self.enabled = False

    def __enter__(self):
        from jax.experimental.compilation_cache import compilation_cache as cc

        if not self.directory or jax.config.jax_compilation_cache_dir:
            return self
        if jax.process_count() > 1 and jax.devices()[0].platform == "cpu":
            return self
        cc.reset_cache()  # the cache is set up on a process's first compile: point it here from now on
        cc.set_cache_dir(self.directory)
        self.enabled = True
        log.info("compiled programs are cached in %s", self.directory)
        return self

    def __exit__(self, *exc):
        from jax.experimental.compilation_cache import compilation_cache as cc

        if self.enabled:
            jax.config.update("jax_compilation_cache_dir", None)
            cc.reset_cache()
            self.enabled = False


class _Profiler:
    """`train.profile_steps` = N: a `jax.profiler` trace of N steps into WORKDIR/profile (TensorBoard's
    profile plugin or Perfetto read it), starting `train.profile_skip` steps after the run (re)starts,
    so that compiling is not in it. Every process writes its own host's trace."""

    def __init__(self, workdir: epath.Path, train_config, first_step: int):
        self.steps = int(train_config.get("profile_steps", 0) or 0)
        self.start = first_step + int(train_config.get("profile_skip", 2))
        self.directory = str(workdir / "profile")
        self.active = False

    def before(self, step: int) -> None:
        if self.steps and step == self.start:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, state) -> None:
        """`step`: the number of steps done; stops the trace (after the device finishes) at the last one."""
        if self.active and step >= self.start + self.steps:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d-%d written to %s", self.start + 1, step, self.directory)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


# Wav2Vec2Config fields that set parameter shapes or the layout of the encoder's weights.
ARCHITECTURE_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "conv_dim",
                       "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm", "do_stable_layer_norm",
                       "num_conv_pos_embeddings", "num_conv_pos_embedding_groups")
INIT_CONFIG = "init_config.json"  # in the workdir: the architecture of `model.init_from`, pinned at the first start


def model_config_from(config: ml_collections.ConfigDict, workdir: str | epath.Path | None = None):
    """The run's model config: `model.preset`, or with `model.init_from` the pretrained directory's own
    architecture (so a converted Hugging Face or fairseq checkpoint needs no matching preset), then
    `model.overrides`. A run pins the init_from architecture in WORKDIR/init_config.json, so resume
    and `export` do not need the pretrained directory any more. `do_normalize` is `data.normalize`:
    inference prepares audio by it, so the exported model must say what the run trained on."""
    overrides = dict(config.model.get("overrides", {}))
    normalize = config.get("data", {}).get("normalize")
    if normalize is not None:
        overrides["do_normalize"] = bool(normalize)
    init_from = config.model.get("init_from", "")
    if not init_from:
        return get_preset(config.model.preset, **overrides)
    import json

    from xlsr_jax.config import Wav2Vec2Config
    from xlsr_jax.model_dir import read_config

    pinned = epath.Path(workdir) / INIT_CONFIG if workdir is not None else None
    if pinned is not None and pinned.is_file():
        base = Wav2Vec2Config.from_dict(json.loads(pinned.read_text()))
    else:
        base, _ = read_config(init_from)
    changed = sorted(k for k in ARCHITECTURE_FIELDS if k in overrides and overrides[k] != getattr(base, k))
    if changed:
        raise ConfigError(f"model.overrides change the architecture of model.init_from={init_from} ({', '.join(changed)}); "
                          "the pretrained weights would not fit: remove those overrides")
    if normalize is not None and base.do_normalize != bool(normalize):
        log.warning("%s was pretrained on %s audio but data.normalize=%s; fine-tuning works best with the "
                    "pretraining's normalization (fairseq requires it)", init_from,
                    "normalized" if base.do_normalize else "unnormalized", bool(normalize))
    return base.replace(**overrides) if overrides else base


def resolve_data_dir(data_dir: str, workdir: epath.Path) -> pathlib.Path:
    """The prepared data directory; "embedded" prepares the bundled corpus into WORKDIR/data once.

    Data is read from local paths (or a bucket mounted with gcsfuse). With a workdir in a bucket,
    "embedded" is prepared by every host into a local cache instead.
    """
    if not data_dir:
        raise ConfigError("config.data.dir is empty: point it at a directory made by `xlsr-jax prepare`")
    if data_dir != "embedded":
        DatasetIndex.load(data_dir)  # a clear error now rather than in the first step
        return pathlib.Path(data_dir)
    from jax.experimental import multihost_utils

    from data_pipelines.corpus import corpus_dir
    from data_pipelines.ingest.prepare import prepare

    if is_local(workdir):
        target = pathlib.Path(workdir) / "data"
        if jax.process_index() == 0 and not (target / "dataset.json").is_file():
            prepare(corpus_dir(), target, workers=0, progress=False)
    else:
        # One copy per process: several processes of one machine must not prepare into one directory.
        target = pathlib.Path.home() / ".cache" / "xlsr_jax" / f"embedded-data-p{jax.process_index()}"
        if not (target / "dataset.json").is_file():
            prepare(corpus_dir(), target, workers=0, progress=False)
    multihost_utils.sync_global_devices("xlsr_jax_embedded_data")
    return target


def check_splits(config: ml_collections.ConfigDict, data_dir) -> None:
    """The configured train and eval splits exist in the prepared data (a clear error before any compile)."""
    splits = DatasetIndex.load(data_dir).splits
    for key in ("train_split", "eval_split"):
        name = config.data.get(key, "")
        if name and name not in splits:
            raise ConfigError(f"data.{key}={name!r} is not a split of {data_dir}; it has {sorted(splits)}"
                              + ("" if key == "train_split" else " (or set data.eval_split='' for none)"))


def pipeline_config(config: ml_collections.ConfigDict, per_host_batch: int, split_seed_offset: int = 0,
                    mesh: jax.sharding.Mesh | None = None):
    """The input pipeline's settings; with `mesh` (training batches) and `data.max_tokens` > 0, batches
    by audio budget: `max_tokens` padded samples per batch shard (data x fsdp device) per micro-batch,
    fairseq's per-GPU `max_tokens`, so a global batch holds max_tokens x shards x accum_steps samples."""
    d = config.data
    budget = {}
    max_tokens = int(d.get("max_tokens", 0) or 0)
    if max_tokens and max_tokens < d.max_sample_size:
        raise ConfigError(f"data.max_tokens={max_tokens} is below data.max_sample_size={d.max_sample_size}: "
                          "each batch shard must hold at least one crop; raise max_tokens or lower the crop")
    if mesh is not None and max_tokens:
        rows = mesh.shape["data"] * mesh.shape["fsdp"] * int(config.train.get("accum_steps", 1))
        budget = {"samples_per_batch": max_tokens * rows, "batch_multiple": rows}
    return PipelineConfig(
        **budget,
        batch_size=per_host_batch,
        seed=d.seed + split_seed_offset,
        max_sample_size=d.max_sample_size,
        min_sample_size=d.min_sample_size,
        normalize=d.normalize,
        num_buckets=d.num_buckets,
        crop_to_bucket=bool(d.get("crop_to_bucket", False)),
        language_alpha=d.get("language_alpha", None),
        language_sampling=d.get("language_sampling", "records"),
        worker_count=d.get("worker_count", 0),
        num_epochs=None,
        skip_unreadable=mesh is not None and int(config.train.get("max_bad_records", 0)) > 0,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path | epath.Path) -> RunResult:
    """Train (or resume) the run described by `config` in `workdir` (a local path or e.g. gs://bucket/run)."""
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with _CompilationCache(workdir, config.train) as cache, contextlib.ExitStack() as cleanup:
        keep = cache.directory and config.train.get("keep_executables", True) and jax.process_count() == 1
        return _train_and_evaluate(config, workdir, epath.Path(cache.directory) / "executables" if keep else None,
                                   cleanup)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path,
                        executables_dir: epath.Path | None, cleanup: contextlib.ExitStack) -> RunResult:
    model_config = model_config_from(config, workdir)
    if config.model.get("init_from") and jax.process_index() == 0 and not (workdir / INIT_CONFIG).is_file():
        (workdir / INIT_CONFIG).write_text((epath.Path(config.model.init_from) / "config.json").read_text())
    mesh = build_run_mesh(config.mesh_preset, config.mesh)
    global_batch = config.data.global_batch_size
    validate_for_model(mesh, model_config, global_batch)
    if global_batch % jax.process_count():
        raise ConfigError(f"global batch {global_batch} is not divisible by {jax.process_count()} processes")
    per_host = global_batch // jax.process_count()
    data_dir = resolve_data_dir(config.data.dir, workdir)
    check_splits(config, data_dir)
    task = make_task(config, model_config, data_dir, workdir)
    program = build_program(config, mesh, task)
    model_config = program.model_config
    train_pipeline = pipeline_config(config, per_host, mesh=mesh)
    if jax.process_index() == 0:
        log.info("%s; %s, %s parameters", describe_job(mesh, global_batch), config.model.preset,
                 f"{program.num_params:,}")
        if train_pipeline.samples_per_batch:
            log.info("audio-budget batches: data.max_tokens %d samples x %d batch shards x %d micro-batches = "
                     "%.0f s (%.2f h) of padded audio per update (global_batch_size %d is the evaluation batch)",
                     config.data.max_tokens, train_pipeline.batch_multiple // program.accum_steps, program.accum_steps,
                     train_pipeline.samples_per_batch / 16000, train_pipeline.samples_per_batch / 16000 / 3600,
                     global_batch)

    train_iter = iter(prepared_dataset(data_dir, config.data.train_split, train_pipeline, task.train_targets))
    best, best_mode = best_metric(config, task)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                best_metric=best or None, best_mode=best_mode,
                                async_save=config.train.get("async_checkpointing", True),
                                use_ocdbt=config.train.get("checkpoint_ocdbt", True))
    resume_step, total = checkpointer.latest_step(), config.train.steps
    if resume_step is not None:
        checkpointer.restore_data(train_iter, resume_step)
    pool = None
    if compile_threads(config.train):  # shut down however the run ends; a compile not started yet is dropped
        pool = concurrent.futures.ThreadPoolExecutor(compile_threads(config.train), thread_name_prefix="compile")
        cleanup.callback(pool.shutdown, wait=False, cancel_futures=True)
    train_step = StepExecutables(program.train_step, executables_dir,
                                 environment_fingerprint(config) if executables_dir else "", pool)
    eval_step = StepExecutables(program.predict_step or program.eval_step, None, "", pool, name="evaluation step")
    # The first batch is read, and its step's program started on a background thread, before the state is
    # initialized or restored: the compile (minutes for 1B/2B on a pod) overlaps the restore (or the init).
    abstract_state, step, first_batch = program.abstract_state_with_shardings(), resume_step or 0, None
    if step < total:
        first_batch = next(train_iter)
        first_global = to_global_batch({k: first_batch[k] for k in task.step_keys}, mesh, program.rules,
                                       task.batch_axes)
        if pool is not None:
            _prepare_ahead(train_step, eval_step, config, data_dir, program, train_pipeline, abstract_state,
                           first_global, step, per_host)
    if resume_step is not None:
        step, state = checkpointer.restore(abstract_state, step=resume_step)
        print(f"resumed from step {step} in {checkpointer.directory}", flush=True)
    else:
        state, _ = create_train_state(program.model, program.optimizer, mesh, program.rules, seed=config.train.seed,
                                      shardings=program.state_shardings)
        if config.model.get("init_from"):
            state = init_encoder_from(state, program.state_shardings, config.model.init_from, mesh, program.rules)

    writer = MetricsWriter(workdir, total, enabled=jax.process_index() == 0)
    peak = device_peak_flops()
    history, eval_history = [], []
    preempted = False
    last_log_time, audio_since_log, flops_since_log = time.perf_counter(), 0.0, 0.0
    max_streak = config.train.max_nonfinite_streak
    max_bad, bad_records = int(config.train.get("max_bad_records", 0)), 0
    config_json = config.to_dict()
    profiler = _Profiler(workdir, config.train, step)
    with _Preemption() as preemption:
        while step < total:
            profiler.before(step)
            host_batch = first_batch if first_batch is not None else next(train_iter)
            if host_batch.get("bad_records", 0):
                bad_records += int(host_batch["bad_records"])
                if bad_records > max_bad:
                    checkpointer.wait()
                    raise TrainingError(
                        f"{bad_records} unreadable training records on this process (the log names each), more "
                        f"than train.max_bad_records={max_bad}; stopping before step {step + 1}. The last "
                        f"checkpoint (step {checkpointer.latest_step()}) is intact. Restore the shards or run "
                        "xlsr-jax prepare again, or raise train.max_bad_records.")
            # Host bookkeeping from the per-row lengths (never the [B, samples] mask): every host reads
            # the same number of rows, so this host's audio x process count is the step's.
            audio_since_log += float(np.sum(host_batch["lengths"])) * jax.process_count() / 16000.0
            rows = host_batch["input_values"].shape[0] * jax.process_count()  # varies with data.max_tokens
            flops_since_log += train_flops_per_step(model_config, program.num_params, rows,
                                                    host_batch["input_values"].shape[1])
            if first_batch is not None:
                batch, first_batch, first_global = first_global, None, None
            else:
                batch = to_global_batch({k: host_batch[k] for k in task.step_keys}, mesh, program.rules,
                                        task.batch_axes)
            frozen = step < program.frozen_until  # the encoder-frozen program (fine-tuning's first phase)
            _prepare_unfreeze(train_step, program, state, batch, step, total)
            state, metrics = train_step(state, batch, frozen)
            step += 1
            profiler.after(step, state)
            log_step = step % config.train.log_every == 0 or step == total
            checkpoint_step = step % config.train.checkpoint_every == 0 or step == total
            # Reading the streak syncs host and device, so only at log and checkpoint steps: a skipped
            # step changes no parameter, so noticing a streak a few steps late costs nothing.
            if (log_step or checkpoint_step) and int(state.nonfinite_streak) >= max_streak:
                checkpointer.wait()
                raise TrainingError(
                    f"{max_streak} consecutive steps had a non-finite loss or gradient (at step {step}); stopping. "
                    f"The last good checkpoint (step {checkpointer.latest_step()}) is intact in "
                    f"{checkpointer.directory}. Lower optim.peak_lr, check the data, or use float32."
                )
            if log_step:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                elapsed = max(now - last_log_time, 1e-9)
                rate = audio_since_log / elapsed
                m["audio_seconds_per_second"] = rate
                m["frames_per_second"] = rate * 16000 / model_config.downsample
                m["step_time"] = elapsed / config.train.log_every
                if max_bad:
                    m["bad_records"] = bad_records  # this process's, since it started
                if peak:
                    m["mfu"] = flops_since_log / elapsed / (peak * jax.device_count())
                last_log_time, audio_since_log, flops_since_log = now, 0.0, 0.0
                writer.write(step, m)
                writer.progress(step, m)
                history.append({"step": step, **m})
            if config.train.eval_every and step % config.train.eval_every == 0:
                eval_history.append({"step": step, **evaluate(config, data_dir, program, state.params, per_host,
                                                              eval_step)})
                writer.write(step, eval_history[-1], prefix="eval")
                writer.eval_line(step, eval_history[-1])
            if preemption.should_stop(step, log_step or checkpoint_step):
                preempted = True
                _save_if_finite(checkpointer, step, state, train_iter, config_json, force=True)
                break
            if checkpoint_step:
                evaluated = eval_history[-1] if eval_history and eval_history[-1]["step"] == step else None
                _save_if_finite(checkpointer, step, state, train_iter, config_json,
                                metrics={best: evaluated[best]} if best and evaluated and best in evaluated else None)
    profiler.close()
    checkpointer.close()
    writer.close()
    return RunResult(step=step, preempted=preempted, history=history, eval_history=eval_history, state=state)


def compile_threads(train_config) -> int:
    """`train.compile_threads`, with -1 resolved from this host's CPUs."""
    threads = int(train_config.get("compile_threads", -1))
    return min(4, max(1, (os.cpu_count() or 1) // 8)) if threads < 0 else threads


def _prepare_ahead(train_step: StepExecutables, eval_step: StepExecutables, config, data_dir, program,
                   train_pipeline: PipelineConfig, abstract_state, first_batch, step: int, per_host: int) -> None:
    """Queue the run's programs on the compile pool in the order the run from `step` needs them: the first
    batch's train step, every other length bucket's (a new bucket would otherwise stop the run to compile),
    then the first evaluation's and fine-tuning's full phase's, whichever comes first."""
    total, frozen = config.train.steps, step < program.frozen_until
    shapes = batch_shapes(PreparedSource(data_dir, config.data.train_split), train_pipeline,
                          program.task.train_targets.crop, jax.process_count())
    batches = [first_batch, *(abstract_batch(program, rows, samples) for rows, samples in shapes)]
    for batch in batches:
        train_step.prepare(abstract_state, batch, frozen)
    later = []
    every = config.train.eval_every
    if every and config.data.eval_split and (step // every + 1) * every <= total:
        later.append(((step // every + 1) * every, lambda: _prepare_evaluation(
            eval_step, config, data_dir, program, abstract_state.params, per_host)))
    if step < program.frozen_until < total:
        later.append((program.frozen_until, lambda: [train_step.prepare(abstract_state, b, False) for b in batches]))
    for _, prepare in sorted(later, key=lambda item: item[0]):
        prepare()


def _objective_eval_batches(config, data_dir) -> int:
    """Batches an evaluation by the objective's metrics reads (`train.eval_batches`; 0: the split's records)."""
    return config.train.eval_batches or math.ceil(
        DatasetIndex.load(data_dir).splits[config.data.eval_split].total_records / config.data.global_batch_size)


def _prepare_evaluation(eval_step: StepExecutables, config, data_dir, program, params, per_host: int) -> None:
    """Start compiling the programs `evaluate` runs (one per padded length of the batches it reads) on the pool."""
    source, pipeline = PreparedSource(data_dir, config.data.eval_split), pipeline_config(config, per_host, 1000)
    if program.predict_step is not None:  # the task's full-split evaluation: the split in length order
        shapes = eval_batch_shapes(source, pipeline, jax.process_count(), config.train.eval_batches)
    else:  # the objective's metrics on batches drawn as for training
        shapes = batch_shapes(source, pipeline, program.task.eval_targets.crop, jax.process_count(),
                              _objective_eval_batches(config, data_dir))
    for rows, samples in shapes:
        eval_step.prepare(params, abstract_eval_batch(program, rows, samples))


def _prepare_unfreeze(executables: StepExecutables, program, state, batch, step: int, total: int) -> None:
    """During fine-tuning's frozen phase of a run that reaches the unfreeze step, start compiling the full
    phase's program for this batch shape in the background (nothing once it is known)."""
    if step < program.frozen_until < total:
        executables.prepare(state, batch, False)


def init_encoder_from(state, shardings, model_dir: str, mesh: jax.sharding.Mesh, rules: Rules):
    """Replace the fresh encoder (`wav2vec2` subtree) with a pretrained model directory's.

    Every array is read straight into its shards on `mesh` (the directory's own logical axis names
    through `rules`): no device or host ever holds a whole pretrained copy.
    """
    from xlsr_jax.model_dir import load_model_dir, read_config

    saved_config, saved_head = read_config(model_dir)
    saved = abstract_params(saved_config.replace(scan_layers=True), saved_head)
    _, _, pretrained = load_model_dir(model_dir, shardings=param_shardings(saved, mesh, rules))
    ours = state.params["wav2vec2"]
    theirs = dict(pretrained["wav2vec2"])
    # Hugging Face saves `masked_spec_embed` only when its config set a masking probability: a model
    # without one starts SpecAugment fine-tuning from a fresh embedding (as transformers does), and a
    # run without masking has no use for it.
    if "masked_spec_embed" in ours and "masked_spec_embed" not in theirs:
        log.warning("%s has no masked_spec_embed (saved without masking): using a freshly initialized one", model_dir)
        theirs["masked_spec_embed"] = ours["masked_spec_embed"]
    elif "masked_spec_embed" not in ours:
        theirs.pop("masked_spec_embed", None)
    mismatch = [jax.tree_util.keystr(p) for p, a, b in _zip_paths(ours, theirs) if a.shape != b.shape]
    ours_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(ours)}
    theirs_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(theirs)}
    mismatch += [f"{p} (missing in {model_dir})" for p in sorted(ours_paths - theirs_paths)]
    mismatch += [f"{p} (not in this model)" for p in sorted(theirs_paths - ours_paths)]
    if mismatch:
        raise ConfigError(f"{model_dir} does not fit this model's encoder (mismatched: {mismatch[:4]}); "
                          "the architecture comes from its config.json: remove model.overrides that change shapes "
                          "(e.g. hidden_size, num_hidden_layers, conv_dim)")
    placed = jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s), theirs, shardings.params["wav2vec2"])
    print(f"encoder initialized from {model_dir}", flush=True)
    return state.replace(params={**state.params, "wav2vec2": placed})


def _zip_paths(a, b):
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    for path, x in flat_a:
        if path in flat_b:
            yield path, x, flat_b[path]


@jax.jit
def _params_finite(params) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)]
    return jnp.all(jnp.stack(leaves))


def _save_if_finite(checkpointer, step, state, data_iter, config_json, force=False, metrics=None) -> None:
    """Never let a checkpoint hold non-finite parameters: the last good one must stay restorable."""
    # One jitted program (a single all-reduce): eager ops on multi-process arrays would each be a
    # separate collective, and a host running ahead into Orbax's barrier deadlocks them.
    if not bool(_params_finite(state.params)):
        log.error("step %d: parameters are not finite; not saving a checkpoint", step)
        return
    checkpointer.save(step, state, data_iter, config_json, metrics=metrics, force=force)


def best_metric(config: ml_collections.ConfigDict, task) -> tuple[str, str]:
    """(eval metric, "min" | "max") the best checkpoint is kept by: `train.best_metric` (with
    `train.best_mode`), or the task's own (WER for CTC, accuracy for language ID) when it is ""."""
    name = config.train.get("best_metric", "")
    if not name:
        return task.best_metric if config.train.eval_every else ("", "min")
    mode = config.train.get("best_mode", "min")
    if mode not in ("min", "max"):
        raise ConfigError(f"train.best_mode must be 'min' or 'max', got {mode!r}")
    return name, mode


def evaluate(config, data_dir, program, params, per_host: int, step: Callable | None = None) -> dict:
    """Eval-split metrics: the task's full-split evaluation, or the mean of the objective's metrics
    over `config.train.eval_batches` batches (tasks without one, e.g. pretraining; 0: as many batches
    as the split has records for). `step` runs the program (default: `program.predict_step`, or else
    `program.eval_step`), e.g. through `StepExecutables`."""
    if not config.data.eval_split:
        return {}
    task, mesh, rules = program.task, program.mesh, program.rules
    step = step or program.predict_step or program.eval_step
    if program.predict_step is not None:
        metrics, _, _ = evaluate_split(task, step, params, data_dir, config.data.eval_split,
                                       pipeline_config(config, per_host, 1000), mesh, rules,
                                       max_batches=config.train.eval_batches)
        return metrics
    num_batches = _objective_eval_batches(config, data_dir)
    ds = prepared_dataset(data_dir, config.data.eval_split, pipeline_config(config, per_host, 1000), task.eval_targets)
    it = iter(ds)
    sums: dict[str, float] = {}
    for _ in range(num_batches):
        batch = to_global_batch({k: v for k, v in next(it).items() if k in task.step_keys}, mesh, rules,
                                task.batch_axes)
        metrics = jax.device_get(step(params, batch))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / num_batches for k, v in sums.items()}
