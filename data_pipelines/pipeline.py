"""The grain input pipeline: a prepared split -> per-host numpy batches with static shapes.

    ds = prepared_dataset(data_dir, "train", PipelineConfig(batch_size=8), PretrainTargets(model_config))
    it = iter(ds)
    batch = next(it)   # {"input_values", "attention_mask", "mask_time_indices", "sampled_negatives"}

Stages (a `grain.MapDataset` over global batch indices, so the iterator state is one integer per
worker and resume is exact):

1. `batching.BatchPlan`: the global record order (`sampling.shuffled_stream`, or
   `sampling.mixed_stream` for multilingual temperature sampling) cut into global batches of
   `batch_size * shard_count` records from one length bucket (with `samples_per_batch`, the
   bucket's audio-budget rows); host `shard_index` takes the `shard_index`-th of `shard_count`
   equal parts of each batch's rows.
2. `_ReadBatch`: reads those records (`grain.sources.ArrayRecordDataSource`), randomly crops
   records longer than `max_sample_size` (offset seeded by (seed, stream position): a record gets
   a new crop each epoch, the same one on resume), normalizes each utterance when asked, and
   right-pads to the bucket length with an `attention_mask`.
3. A task's target (see `Targets`; the tasks live in `xlsr_jax.tasks`) as a grain `random_map`:
   masks and negatives, labels, or language ids, seeded by (seed, shard, batch index).
4. `to_iter_dataset` with reader threads, then `mp_prefetch` worker processes when
   `worker_count > 0`.

`eval_dataset` reads every record of a split exactly once (no cropping, no filtering by length),
for evaluation that scores a whole split.

Checkpointing: `it.get_state()` / `it.set_state(state)`, or with Orbax
`ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it))` and `CheckpointRestore(it)`.
A state saved with worker processes restores only into a pipeline with the same `worker_count`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Protocol

import grain
import numpy as np

from data_pipelines import audio, sampling
from data_pipelines.batching import (BatchPlan, EvalPlan, assign_buckets, bucket_lengths, budget_batch_sizes,
                                    crop_bucket_lengths)
from data_pipelines.errors import UserError
from data_pipelines.sources import AudioSource, PreparedSource, UnreadableRecordError

log = logging.getLogger(__name__)


class Targets(Protocol):
    """A task's batch completion: raw padded batch -> the arrays its train step consumes.

    The raw batch holds `input_values` [B, L] float32, `attention_mask` [B, L] int32, `lengths` [B]
    samples, `texts` (list of str), `language_id` [B] int32 and `positions` [B] (global stream
    positions, to seed per-row randomness).
    """

    crop: bool  # True: records longer than max_sample_size are cropped; False: dropped

    def check(self, min_sample_size: int) -> None:
        """Raise ValueError if the shortest record kept cannot be used."""
        ...

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict: ...


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Knobs of the input pipeline (sizes in 16 kHz samples)."""

    batch_size: int  # per host (with samples_per_batch: unused by training batches, still the eval batch)
    seed: int = 0
    max_sample_size: int = 320_000  # 20 s: longer records are cropped (or dropped, for CTC)
    min_sample_size: int = 32_000  # 2 s: shorter records are dropped
    normalize: bool = False  # zero mean, unit variance per utterance (fairseq `normalize`, HF do_normalize)
    num_buckets: int = 3  # distinct padded lengths, i.e. compiled programs (fairseq TPU: 3)
    # Crop every row of a batch to its bucket's length, at most its shortest row's: no padding at all.
    # fairseq's pad=False crops each batch to its shortest utterance; group-norm models (wav2vec 2.0
    # base) normalize the first conv over time, padding included, so they need it.
    crop_to_bucket: bool = False
    pad_multiple: int = 320  # bucket lengths are multiples of the conv stack's stride
    num_epochs: int | None = None  # None repeats forever
    language_alpha: float | None = None  # None: uniform over records; a float: XLS-R language sampling
    language_sampling: str = "records"  # what n_l counts in p_l ~ (n_l / N)^alpha: "records" or "hours" (XLS-R)
    # Audio-budget batches (fairseq max_tokens): a global batch from a bucket of length L has the most
    # rows, a multiple of batch_multiple, with rows x L <= samples_per_batch. 0: `batch_size` rows per host.
    samples_per_batch: int = 0
    batch_multiple: int = 1  # global rows per batch are a multiple of this (and of the host count)
    window_batches: int = 1024  # global batches planned together (bucketing and batch shuffle scope)
    worker_count: int = 0  # decoding processes (grain mp_prefetch); 0 decodes in this process
    worker_buffer_size: int = 2  # batches each worker keeps ready
    read_threads: int = 1  # threads per process that prepare batches ahead
    prefetch_batches: int = 4
    # Training batches only: an unreadable record (see sources.UnreadableRecordError) is logged and its
    # row filled with a copy of another row of the batch, and the batch carries `bad_records` (its count)
    # for the train loop to report and limit. False: the error stops the pipeline.
    skip_unreadable: bool = False

    def validate(self) -> None:
        """Raise ValueError naming every inconsistent setting."""
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.min_sample_size <= self.max_sample_size:
            problems.append(
                "need 0 < min_sample_size <= max_sample_size, "
                f"got {self.min_sample_size}, {self.max_sample_size}"
            )
        if not 1 <= self.num_buckets <= 16:
            problems.append(f"num_buckets must be in [1, 16], got {self.num_buckets}")
        if self.language_sampling not in ("records", "hours"):
            problems.append(f"language_sampling must be 'records' or 'hours', got {self.language_sampling!r}")
        if self.language_alpha is not None and self.num_epochs is not None:
            problems.append("language sampling repeats each language on its own: set num_epochs=None")
        if self.samples_per_batch < 0 or self.batch_multiple < 1:
            problems.append(f"need samples_per_batch >= 0 and batch_multiple >= 1, got {self.samples_per_batch}, "
                            f"{self.batch_multiple}")
        if self.samples_per_batch and self.num_epochs is not None:
            problems.append("audio-budget batches (samples_per_batch) need num_epochs=None")
        if self.worker_count < 0 or self.read_threads < 0:
            problems.append("worker_count and read_threads must be >= 0")
        if problems:
            raise UserError("invalid PipelineConfig: " + "; ".join(problems))


def _normalize_inplace(row: np.ndarray, scale: float) -> None:
    """`audio.normalize(row * scale)` in place, in fewer passes (the pipeline's hottest loop)."""
    # (x*s - m*s) / sqrt(s^2 v + eps) = (x - m) / sqrt(v + eps / s^2): the scale folds into eps.
    row -= row.mean()
    var = float(np.dot(row, row)) / max(len(row), 1)
    row *= np.float32(1.0 / np.sqrt(var + audio._NORM_EPS / (scale * scale)))


def _crop_offset(seed: int, position: int, excess: int) -> int:
    return int(np.random.default_rng([seed, 1, int(position)]).integers(0, excess + 1))


class _ReadBatch:
    """Global batch index -> this host's raw padded batch (see `targets.py` for its keys)."""

    def __init__(self, source: AudioSource, plan: BatchPlan | EvalPlan, config: PipelineConfig, shard_index: int,
                 shard_count: int):
        self.source, self.plan, self.config = source, plan, config
        self.shard_index, self.shard_count = shard_index, shard_count

    def __call__(self, index: int) -> dict:
        positions, recs, padded = self.plan.batch(int(index))
        rows = len(recs) // self.shard_count  # every host reads the same number of rows
        mine = slice(self.shard_index * rows, (self.shard_index + 1) * rows)
        positions, recs = positions[mine], recs[mine]
        cfg = self.config
        limit = padded if cfg.crop_to_bucket else cfg.max_sample_size
        values = np.zeros((len(recs), padded), dtype=np.float32)
        mask = np.zeros((len(recs), padded), dtype=np.int32)
        lengths = np.zeros(len(recs), dtype=np.int64)
        texts = []
        fill, read, bad = self._read(recs)
        recs = recs[fill]  # a skipped record's row is a copy of a readable one of this batch
        for i, ((wave, text), pos) in enumerate(zip(read, positions)):
            if len(wave) > limit:
                start = _crop_offset(cfg.seed, pos, len(wave) - limit)
                wave = wave[start : start + limit]
            n = len(wave)
            row = values[i, :n]
            row[:] = wave  # int16 -> float32 of the kept samples only
            scale = 1.0 / 32768.0 if wave.dtype == np.int16 else 1.0  # the scale of records.decode_record
            if cfg.normalize:
                _normalize_inplace(row, scale)
            elif scale != 1.0:
                row *= np.float32(scale)
            mask[i, :n] = 1
            lengths[i] = n
            texts.append(text)
        return {
            "input_values": values,
            "attention_mask": mask,
            "lengths": lengths,
            "texts": texts,
            "language_id": self.source.language_ids[recs].astype(np.int32),
            "positions": np.asarray(positions, np.int64),  # global stream positions (seed per-row targets)
            **({"bad_records": np.int64(bad)} if self.config.skip_unreadable else {}),
        }

    def _read(self, recs: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, str]], int]:
        """(the row whose record fills each row, (audio, text) per row, how many rows were substituted)."""
        try:
            return np.arange(len(recs)), self.source.read(recs), 0
        except UnreadableRecordError:
            if not self.config.skip_unreadable:
                raise
        rows: list[tuple[np.ndarray, str] | None] = []
        for r in recs:  # again one record at a time, to find which ones fail
            try:
                rows.append(self.source.read([r])[0])
            except UnreadableRecordError as e:
                log.warning("skipping an unreadable training record: %s", e)
                rows.append(None)
                error = e
        good = [i for i, row in enumerate(rows) if row is not None]
        if not good:
            raise UnreadableRecordError(error.shard, error.record, ValueError(
                f"and every other record of its batch ({len(recs)} rows) is unreadable too"))
        # Each bad row takes the nearest readable row before it (after it for leading bad rows): the
        # batch keeps its shape and bucket, and the loss sees only real audio.
        fill = [max([g for g in good if g <= i], default=good[0]) for i in range(len(rows))]
        return np.asarray(fill), [rows[f] for f in fill], len(rows) - len(good)


class _KeepBadCount:
    """`targets`, with the raw batch's `bad_records` count passed through."""

    def __init__(self, targets: Targets):
        self.targets = targets

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        return {**self.targets(raw, rng), "bad_records": raw["bad_records"]}


def _absl_flags_parsed() -> None:
    """grain 0.2.18's mp_prefetch reads an absl flag and fails outside an absl app; use the defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def usable_records(source: AudioSource, config: PipelineConfig, crop: bool) -> np.ndarray:
    """Indices of records kept by the length filters (too short; too long when not cropping)."""
    keep = source.lengths >= config.min_sample_size
    if not crop:
        keep &= source.lengths <= config.max_sample_size
    return np.flatnonzero(keep)


@dataclasses.dataclass(frozen=True)
class _Bucketing:
    kept: np.ndarray  # the usable records
    effective: np.ndarray  # samples of every record after cropping
    buckets: np.ndarray  # padded length of each bucket
    kept_ids: np.ndarray  # the bucket of each kept record
    batch_sizes: np.ndarray | None  # global rows per bucket (audio-budget batches), or None


def _bucketing(source: AudioSource, config: PipelineConfig, crop: bool, shard_count: int) -> _Bucketing:
    config.validate()
    kept = usable_records(source, config, crop)
    if len(kept) == 0:
        raise UserError(
            f"no record of {len(source)} is within [min_sample_size={config.min_sample_size}, "
            f"max_sample_size={config.max_sample_size}] samples"
        )
    effective = np.minimum(source.lengths, config.max_sample_size)
    if config.crop_to_bucket:
        if not crop:
            raise UserError("crop_to_bucket crops audio, which this task's targets (e.g. transcripts) forbid")
        buckets = crop_bucket_lengths(effective[kept], config.num_buckets, config.pad_multiple)
    else:
        buckets = bucket_lengths(effective[kept], config.num_buckets, config.pad_multiple)
    kept_ids = assign_buckets(effective[kept], buckets, crop=config.crop_to_bucket)
    batch_sizes = None
    if config.samples_per_batch:
        multiple = math.lcm(config.batch_multiple, shard_count)
        batch_sizes = budget_batch_sizes(buckets, config.samples_per_batch, multiple)
    return _Bucketing(kept, effective, buckets, kept_ids, batch_sizes)


def batch_shapes(source: AudioSource, config: PipelineConfig, crop: bool, shard_count: int,
                 max_batches: int = 0) -> list[tuple[int, int]]:
    """(global rows, padded samples) of each length bucket: every batch shape `make_dataset` can produce
    with these arguments (a bucket of no records of its own can still take a shorter bucket's leftovers);
    with `max_batches` > 0, those of its first `max_batches` batches, in the order they first come."""
    if max_batches:
        plan = make_plan(source, config, crop, shard_count)
        count = min(max_batches, plan.num_batches)
        return list(dict.fromkeys((len(recs), padded) for _, recs, padded in map(plan.batch, range(count))))
    b = _bucketing(source, config, crop, shard_count)
    rows = b.batch_sizes if b.batch_sizes is not None else [config.batch_size * shard_count] * len(b.buckets)
    return [(int(r), int(n)) for r, n in zip(rows, b.buckets)]


def make_plan(source: AudioSource, config: PipelineConfig, crop: bool, shard_count: int) -> BatchPlan:
    """The global batch plan every host shares (same arguments -> same plan on every host)."""
    b = _bucketing(source, config, crop, shard_count)
    kept, effective, buckets, kept_ids, batch_sizes = b.kept, b.effective, b.buckets, b.kept_ids, b.batch_sizes
    if config.language_alpha is None:
        stream = sampling.shuffled_stream(kept, config.seed, config.num_epochs)
        bucket_probs = np.bincount(kept_ids, minlength=len(buckets)) / len(kept)
    else:
        languages = source.language_ids[kept]
        by_hours = config.language_sampling == "hours"
        stream, weights = sampling.mixed_stream(kept, languages, config.seed, config.language_alpha,
                                                lengths=source.lengths[kept] if by_hours else None,
                                                trained_lengths=effective[kept] if by_hours else None)
        # The stream's bucket mix: each language's own bucket shares, weighted by how often it is drawn.
        bucket_probs = np.zeros(len(buckets))
        for lang in np.flatnonzero(weights):
            ids = kept_ids[languages == lang]
            bucket_probs += weights[lang] * np.bincount(ids, minlength=len(buckets)) / len(ids)
    if batch_sizes is not None:
        log.info("audio-budget batches: bucket lengths %s samples -> %s global rows (budget %d samples, %.0f s)",
                 buckets.tolist(), batch_sizes.tolist(), config.samples_per_batch, config.samples_per_batch / 16000)
    return BatchPlan(
        stream,
        effective,
        buckets,
        config.batch_size * shard_count,
        config.window_batches,
        config.seed,
        len(kept),
        batch_sizes=batch_sizes,
        bucket_probs=bucket_probs if batch_sizes is not None else None,
        crop_to_bucket=config.crop_to_bucket,
    )


def make_dataset(
    source: AudioSource,
    config: PipelineConfig,
    targets: Targets,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Batches for host `shard_index` of `shard_count` (pass jax.process_index()/process_count())."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    targets.check(config.min_sample_size)
    plan = make_plan(source, config, targets.crop, shard_count)
    ds = grain.MapDataset.range(plan.num_batches).map(_ReadBatch(source, plan, config, shard_index, shard_count))
    ds = ds.random_map(_KeepBadCount(targets) if config.skip_unreadable else targets,
                       seed=sampling.derived_seed(config.seed, 3, shard_index))
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_batches)
    )
    if config.worker_count > 0:
        _absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size
            )
        )
    return it_ds


def prepared_dataset(
    data_dir: str | pathlib.Path,
    split: str,
    config: PipelineConfig,
    targets: Targets,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """`make_dataset` over a prepared directory; the shard defaults to this JAX process."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    return make_dataset(
        PreparedSource(data_dir, split), config, targets, shard_index=shard_index, shard_count=shard_count
    )


class _MarkValid:
    """Adds `valid` [B] bool: False on the rows that only pad a split's last global batch."""

    def __init__(self, plan: EvalPlan, shard_index: int, batch_size: int):
        self.plan, self.rows = plan, slice(shard_index * batch_size, (shard_index + 1) * batch_size)

    def __call__(self, index: int, batch: dict) -> dict:
        return {**batch, "valid": self.plan.valid(int(index))[self.rows]}


def _eval_plan(source: AudioSource, config: PipelineConfig, shard_count: int) -> EvalPlan:
    lengths = np.asarray(source.lengths, np.int64)
    if len(lengths) == 0:
        raise UserError("the evaluation split has no records")
    buckets = bucket_lengths(lengths, config.num_buckets, config.pad_multiple)
    return EvalPlan(lengths, buckets, config.batch_size * shard_count)


def eval_batch_shapes(source: AudioSource, config: PipelineConfig, shard_count: int,
                      max_batches: int = 0) -> list[tuple[int, int]]:
    """(global rows, padded samples) of the batches `eval_dataset` gives (of its first `max_batches` when > 0),
    in the order they first come."""
    plan = _eval_plan(source, config, shard_count)
    count = min(max_batches, plan.num_batches) if max_batches else plan.num_batches
    shapes = dict.fromkeys((len(recs), padded) for _, recs, padded in map(plan.batch, range(count)))
    return list(shapes)


def eval_dataset(
    source: AudioSource,
    config: PipelineConfig,
    targets: Targets,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Every record of `source` once, in length order, for host `shard_index`; batches carry `valid`.

    Records are neither cropped nor dropped (a score over a split must see all of it); padded
    lengths come from `num_buckets` buckets over the split's lengths, so a handful of programs
    compile. The last global batch is filled with copies of its first row marked `valid=False`.
    Every host gets the same number of batches.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    plan = _eval_plan(source, config, shard_count)
    lengths = plan.lengths
    whole = dataclasses.replace(config, max_sample_size=int(lengths.max()), min_sample_size=1, crop_to_bucket=False)
    ds = grain.MapDataset.range(plan.num_batches).map(_ReadBatch(source, plan, whole, shard_index, shard_count))
    ds = ds.random_map(targets, seed=sampling.derived_seed(config.seed, 3, shard_index))
    ds = ds.map_with_index(_MarkValid(plan, shard_index, config.batch_size))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                prefetch_buffer_size=config.prefetch_batches))


def prepared_eval_dataset(data_dir: str | pathlib.Path, split: str, config: PipelineConfig,
                          targets: Targets) -> grain.IterDataset:
    """`eval_dataset` over a prepared directory for this JAX process."""
    import jax

    return eval_dataset(PreparedSource(data_dir, split), config, targets, shard_index=jax.process_index(),
                        shard_count=jax.process_count())
