"""`prepare` on Apache Beam: the same shards as the local path, decoded by a runner's workers.

The launcher discovers the inputs and plans the shards exactly as `prepare.prepare` does
(`prepare.plan_job`). The pipeline then

1. fans every shard's files out (`Reshuffle`, so decoding spreads over the workers);
2. decodes each file with `decode.decode_item` (resample, validate, encode), counting files, bad
   inputs and audio;
3. groups the decoded files by shard and writes each shard in its plan order (`prepare.shard_records`,
   the local path's code) to a temporary name unique to the attempt, renamed to the shard's name once
   complete, then writes the shard's result (lengths, languages, skipped files) beside it.

A failed or retried attempt leaves at most a temporary file, never a partial shard under its final
name. After the run the launcher logs every shard's result in the progress log and writes the
lengths/languages arrays, `report.tsv` and `dataset.json` with the local path's code
(`prepare.finish`), so the directory is the local path's, record for record: training, its resume
state and a later local `prepare` (which resumes from the progress log) cannot tell which wrote it.

Paths are local or mounted on every worker (the DirectRunner's workers share the launcher's disk).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import uuid
from collections.abc import Iterable, Sequence

from data_pipelines.audio import SAMPLE_RATE, AudioError
from data_pipelines.errors import UserError
from data_pipelines.ingest.decode import Decoded, Filters, decode_item
from data_pipelines.ingest.layouts import Item
from data_pipelines.ingest.prepare import Job, finish, plan_job, shard_records
from data_pipelines.ingest.shards import ProgressLog, ShardPlan, ShardResult, write_shard
from data_pipelines.records import DatasetIndex

log = logging.getLogger(__name__)

RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner"}
RESULTS_DIR = "beam_results"  # per-shard results the workers write; removed once logged
COUNTERS = "xlsr_prepare"  # Beam metrics namespace


def _import_beam():
    try:
        import apache_beam as beam
    except ImportError as e:
        raise UserError("prepare --runner needs Apache Beam: pip install -e '.[beam]'") from e
    return beam


def _fan_out(plan: ShardPlan) -> Iterable[tuple[str, int, Item]]:
    for position, item in enumerate(plan.items):
        yield plan.name, position, item


class _Decode:
    """(shard, position, item) -> (shard, (position, item, Decoded)), counting what was read."""

    def __init__(self, filters: Filters, codec: str):
        self.filters, self.codec = filters, codec

    def __call__(self, element: tuple[str, int, Item]):
        from apache_beam.metrics import Metrics

        name, position, item = element
        decoded = decode_item(item, self.filters, self.codec)
        Metrics.counter(COUNTERS, "files_read").inc()
        if decoded.skip is not None:
            Metrics.counter(COUNTERS, "bad_inputs").inc()
        Metrics.counter(COUNTERS, "audio_ms").inc(sum(decoded.lengths) * 1000 // SAMPLE_RATE)
        return name, (position, item, decoded)


class _WriteShard:
    """(shard, [(position, item, Decoded)]) -> the shard file and its result JSON; yields the shard name.

    `fail_after`: test hook, raise after this many records of the first attempt at each shard (a worker
    dying mid-shard), recorded in `out/.fail_once`.
    """

    def __init__(self, out: pathlib.Path, split_of: dict[str, str], fail_after: int | None = None):
        self.out, self.split_of, self.fail_after = out, split_of, fail_after

    def __call__(self, element: tuple[str, Iterable[tuple[int, Item, Decoded]]]):
        from apache_beam.metrics import Metrics

        name, group = element
        ordered = sorted(group, key=lambda e: e[0])
        plan = ShardPlan(self.split_of[name], name, tuple(item for _, item, _ in ordered))
        result = ShardResult()
        records = shard_records(plan, iter([d for _, _, d in ordered]), result, strict=False, on_item=lambda n: None)
        if self.fail_after is not None:
            records = self._failing(name, records)
        # A name unique to this attempt: a retried or duplicated bundle never writes into another's file.
        write_shard(self.out / name, records, tmp_suffix=f".tmp-{uuid.uuid4().hex}")
        results = self.out / RESULTS_DIR
        results.mkdir(exist_ok=True)
        tmp = results / f"{name}.json.tmp-{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(dataclasses.asdict(result), ensure_ascii=False), encoding="utf-8",
                       errors="surrogateescape")
        os.replace(tmp, results / f"{name}.json")
        log.info("wrote %s: %d records, %d files skipped", name, result.num_records, len(result.skipped))
        Metrics.counter(COUNTERS, "records_written").inc(result.num_records)
        Metrics.counter(COUNTERS, "shards_written").inc()
        yield name

    def _failing(self, name: str, records: Iterable[bytes]) -> Iterable[bytes]:
        marker = self.out / f".fail_once-{name}.marker"
        for k, record in enumerate(records):
            if k == self.fail_after and not marker.exists():
                marker.touch()
                raise RuntimeError(f"injected worker failure in {name} after {k} records")
            yield record


@dataclasses.dataclass(frozen=True)
class BeamCounters:
    files_read: int
    bad_inputs: int
    records_written: int
    shards_written: int
    audio_hours: float

    def summary(self) -> str:
        return (f"beam counters: {self.files_read} files read, {self.bad_inputs} bad inputs, "
                f"{self.records_written} records in {self.shards_written} shards, {self.audio_hours:.3f} h of audio")


def _counters(result) -> BeamCounters:
    from apache_beam.metrics.metric import MetricsFilter

    values: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(COUNTERS))["counters"]:
        try:
            value = counter.committed
        except Exception:  # noqa: BLE001 - runners without committed metrics (e.g. some portable ones)
            value = None
        values[counter.key.metric.name] = values.get(counter.key.metric.name, 0) + int(
            value if value is not None else counter.attempted)
    return BeamCounters(values.get("files_read", 0), values.get("bad_inputs", 0), values.get("records_written", 0),
                        values.get("shards_written", 0), values.get("audio_ms", 0) / 3_600_000)


def _pipeline_options(runner: str, beam_options: Sequence[str]):
    from apache_beam.options.pipeline_options import PipelineOptions

    if runner not in RUNNERS:
        raise UserError(f"unknown runner {runner!r}; choose one of {sorted(RUNNERS)}")
    flags = list(beam_options)
    if not any(f.startswith("--runner") for f in flags):
        flags.append(f"--runner={RUNNERS[runner]}")
    return PipelineOptions(flags)


def run_job(job: Job, runner: str = "direct", beam_options: Sequence[str] = (),
            fail_after: int | None = None) -> tuple[DatasetIndex, BeamCounters | None]:
    """Runs a planned job on Beam (resuming the shards a progress log says are done); returns the index
    `prepare.finish` writes and the pipeline's counters (None when every shard was already done)."""
    beam = _import_beam()
    options = _pipeline_options(runner, beam_options)
    out = job.out
    progress = ProgressLog(out, job.settings)
    results = {p.name: r for p in job.plans if (r := progress.done(p.name)) is not None}
    todo = [p for p in job.plans if p.name not in results]
    counters = None
    if todo:
        shutil.rmtree(out / RESULTS_DIR, ignore_errors=True)  # an earlier failed run's
        log.info("beam: %d files in %d shards on %s", sum(len(p.items) for p in todo), len(todo), runner)
        with beam.Pipeline(options=options) as pipeline:
            _ = (pipeline
                 | "Shards" >> beam.Create(todo)
                 | "Files" >> beam.FlatMap(_fan_out)
                 | "Spread" >> beam.Reshuffle()
                 | "Decode" >> beam.Map(_Decode(job.filters, job.codec))
                 | "ByShard" >> beam.GroupByKey()
                 | "Write" >> beam.FlatMap(_WriteShard(out, {p.name: p.split for p in todo}, fail_after)))
        counters = _counters(pipeline.result)
        for plan in todo:
            raw = json.loads((out / RESULTS_DIR / f"{plan.name}.json").read_text(encoding="utf-8",
                                                                                 errors="surrogateescape"))
            results[plan.name] = ShardResult(**raw)
            progress.add(plan.name, results[plan.name])
        shutil.rmtree(out / RESULTS_DIR)
    for leftover in out.glob(".fail_once-*"):
        leftover.unlink()
    if job.strict:
        for plan in job.plans:
            if results[plan.name].skipped:
                path, reason, detail = results[plan.name].skipped[0]
                raise AudioError(path, f"{reason} ({detail})")
    return finish(job, results), counters


def prepare_beam(inputs, output_dir, runner: str = "direct", beam_options: Sequence[str] = (),
                 **settings) -> tuple[DatasetIndex, BeamCounters | None]:
    """`prepare.prepare` on Beam: `settings` are `prepare.plan_job`'s keyword arguments."""
    _import_beam()
    return run_job(plan_job(inputs, output_dir, **settings), runner, beam_options)
