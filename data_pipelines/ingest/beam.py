"""`prepare` on Apache Beam: the same shards as the local path, decoded by a runner's workers.

The launcher discovers the inputs and plans the shards exactly as `prepare.prepare` does
(`prepare.plan_job`). The pipeline then

1. reads the plan, one line per file, from a file the launcher wrote beside the output, and spreads
   the files over the workers (`Reshuffle`);
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

Inputs and the output may be local paths (seen by every worker under the same name: the DirectRunner's
workers share the launcher's disk) or bucket URLs (gs://...): the launcher lists and reads manifests
through `etils.epath` (gcsfs), workers fetch and write through Beam's file systems.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence

from data_pipelines.audio import SAMPLE_RATE, AudioError
from data_pipelines.errors import UserError
from data_pipelines.ingest.decode import Decoded, Filters, decode_item
from data_pipelines.ingest.layouts import Item, is_remote
from data_pipelines.ingest.prepare import Job, finish, plan_job, shard_records
from data_pipelines.ingest.shards import ProgressLog, ShardPlan, ShardResult, write_shard
from data_pipelines.records import DatasetIndex

log = logging.getLogger(__name__)

RUNNERS = {"direct": "DirectRunner", "dataflow": "DataflowRunner", "flink": "FlinkRunner", "spark": "SparkRunner"}
RESULTS_DIR = "beam_results"  # per-shard results the workers write; removed once logged
_COPY_CHUNK = 8 << 20
COUNTERS = "xlsr_prepare"  # Beam metrics namespace


def _import_beam():
    try:
        import apache_beam as beam
    except ImportError as e:
        raise UserError("prepare --runner needs Apache Beam: pip install -e '.[beam]'") from e
    return beam


PLAN_FILE = "plan.jsonl"  # in RESULTS_DIR: one line per input file, read by the pipeline


def _write_plan(path: str, plans: Sequence[ShardPlan]) -> None:
    """The files of `plans` as JSON lines (shard, position, item) for `ReadFromText`: a corpus-sized list
    inside the pipeline graph would exceed what a runner accepts (Dataflow: 10 MB)."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    if not is_remote(path):
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileSystems.create(path, mime_type="text/plain", compression_type=CompressionTypes.UNCOMPRESSED) as f:
        for plan in plans:
            for position, item in enumerate(plan.items):
                # ASCII: a file name that is not UTF-8 keeps its escaped bytes (\udcXX) through the round trip
                f.write((json.dumps([plan.name, position, dataclasses.asdict(item)]) + "\n").encode("ascii"))


def _parse_plan_line(line: str) -> tuple[str, int, Item]:
    name, position, fields = json.loads(line)
    if fields["skip"] is not None:
        fields["skip"] = tuple(fields["skip"])
    return name, position, Item(**fields)


class _Decode:
    """(shard, position, item) -> (shard, (position, item, Decoded)), counting what was read."""

    def __init__(self, filters: Filters, codec: str):
        self.filters, self.codec = filters, codec

    def __call__(self, element: tuple[str, int, Item]):
        from apache_beam.metrics import Metrics

        name, position, item = element
        decoded = _decode_remote(item, self.filters, self.codec) if is_remote(item.path) else decode_item(
            item, self.filters, self.codec)
        Metrics.counter(COUNTERS, "files_read").inc()
        if decoded.skip is not None:
            Metrics.counter(COUNTERS, "bad_inputs").inc()
        Metrics.counter(COUNTERS, "audio_ms").inc(sum(decoded.lengths) * 1000 // SAMPLE_RATE)
        return name, (position, item, decoded)


def _decode_remote(item: Item, filters: Filters, codec: str) -> Decoded:
    """`decode_item` of a file in a bucket, fetched through Beam's file systems into a local temporary file."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    if item.skip is not None:
        return Decoded(skip=item.skip)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "audio" + pathlib.PurePosixPath(item.path).suffix)
        try:
            with FileSystems.open(item.path, compression_type=CompressionTypes.UNCOMPRESSED) as src, \
                    open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, _COPY_CHUNK)
        except Exception as e:  # noqa: BLE001 - Beam wraps a missing object or a refused read in its own errors
            return Decoded(skip=("unreadable", f"cannot be fetched: {type(e).__name__}: {e}"))
        decoded = decode_item(dataclasses.replace(item, path=local), filters, codec)
    if decoded.skip is not None:  # the details name the file as the report does
        decoded = dataclasses.replace(decoded, skip=(decoded.skip[0], decoded.skip[1].replace(local, item.path)))
    return decoded


def _join(directory, name: str) -> str:
    return f"{str(directory).rstrip('/')}/{name}"


def _upload(local: pathlib.Path, dest: str) -> None:
    """Copies a local file to `dest` through Beam's file systems (a bucket object appears whole, or not at all)."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with open(local, "rb") as src, FileSystems.create(dest, mime_type="application/octet-stream",
                                                      compression_type=CompressionTypes.UNCOMPRESSED) as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)


def _read_text(path: str) -> str:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read().decode("utf-8", errors="surrogateescape")


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
        def result_json() -> str:  # once the shard is written: `records` fills `result` as it is consumed
            return json.dumps(dataclasses.asdict(result), ensure_ascii=False)

        if is_remote(self.out):  # written locally, then uploaded: an object is created whole on close
            with tempfile.TemporaryDirectory() as tmp:
                write_shard(pathlib.Path(tmp, name), records)
                _upload(pathlib.Path(tmp, name), _join(self.out, name))
                pathlib.Path(tmp, "result.json").write_text(result_json(), encoding="utf-8", errors="surrogateescape")
                _upload(pathlib.Path(tmp, "result.json"), _join(self.out, f"{RESULTS_DIR}/{name}.json"))
        else:
            # A name unique to this attempt: a retried or duplicated bundle never writes into another's file.
            write_shard(self.out / name, records, tmp_suffix=f".tmp-{uuid.uuid4().hex}")
            results = self.out / RESULTS_DIR
            results.mkdir(exist_ok=True)
            tmp = results / f"{name}.json.tmp-{uuid.uuid4().hex}"
            tmp.write_text(result_json(), encoding="utf-8", errors="surrogateescape")
            os.replace(tmp, results / f"{name}.json")
        log.info("wrote %s: %d records, %d files skipped", name, result.num_records, len(result.skipped))
        Metrics.counter(COUNTERS, "records_written").inc(result.num_records)
        Metrics.counter(COUNTERS, "shards_written").inc()
        yield name

    def _failing(self, name: str, records: Iterable[bytes]) -> Iterable[bytes]:
        marker = pathlib.Path(self.out) / f".fail_once-{name}.marker"  # local output only
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
    """Runs a planned job on Beam; returns the index `prepare.finish` writes and the pipeline's counters
    (None when every shard was already done).

    A local output resumes from its progress log (the shards a finished run wrote are not redone). A
    bucket output is assembled in a local staging directory and uploaded, `dataset.json` last; it must
    not hold a finished data set, and a rerun writes every shard again."""
    beam = _import_beam()
    options = _pipeline_options(runner, beam_options)
    local = [p for p in [*job.source["inputs"], str(job.out)] if not is_remote(p)]
    if runner == "dataflow" and local:
        raise UserError(f"Dataflow workers cannot see this machine's files ({', '.join(local)}): put the inputs "
                        "and the output in a bucket (gs://...)")
    remote = is_remote(job.out)
    staging = pathlib.Path(tempfile.mkdtemp(prefix="xlsr_prepare_")) if remote else job.out
    try:
        if remote and _exists(_join(job.out, "dataset.json")):
            raise UserError(f"{job.out} already holds a prepared data set (dataset.json); choose a new directory")
        local_job = dataclasses.replace(job, out=staging)
        progress = ProgressLog(staging, job.settings)
        results = {p.name: r for p in job.plans if (r := progress.done(p.name)) is not None}
        todo = [p for p in job.plans if p.name not in results]
        counters = None
        if todo:
            _delete(_join(job.out, RESULTS_DIR))  # an earlier failed run's
            log.info("beam: %d files in %d shards on %s", sum(len(p.items) for p in todo), len(todo), runner)
            plan_file = _join(job.out, f"{RESULTS_DIR}/{PLAN_FILE}")
            _write_plan(plan_file, todo)
            with beam.Pipeline(options=options) as pipeline:
                _ = (pipeline
                     | "Plan" >> beam.io.ReadFromText(plan_file)
                     | "Files" >> beam.Map(_parse_plan_line)
                     | "Spread" >> beam.Reshuffle()
                     | "Decode" >> beam.Map(_Decode(job.filters, job.codec))
                     | "ByShard" >> beam.GroupByKey()
                     | "Write" >> beam.FlatMap(_WriteShard(job.out, {p.name: p.split for p in todo}, fail_after)))
            counters = _counters(pipeline.result)
            for plan in todo:
                raw = json.loads(_read_text(_join(job.out, f"{RESULTS_DIR}/{plan.name}.json")))
                results[plan.name] = ShardResult(**raw)
                progress.add(plan.name, results[plan.name])
            _delete(_join(job.out, RESULTS_DIR))
        if not remote:
            for leftover in staging.glob(".fail_once-*"):  # `fail_after`'s markers
                leftover.unlink()
        if job.strict:
            for plan in job.plans:
                if results[plan.name].skipped:
                    path, reason, detail = results[plan.name].skipped[0]
                    raise AudioError(path, f"{reason} ({detail})")
        index = finish(local_job, results)
        if remote:
            names = sorted(p.name for p in staging.iterdir() if p.name != "dataset.json")
            for name in [*names, "dataset.json"]:  # a bucket directory with a dataset.json is complete
                _upload(staging / name, _join(job.out, name))
        return index, counters
    finally:
        if remote:
            shutil.rmtree(staging, ignore_errors=True)


def _exists(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path)


def _delete(directory: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    if is_remote(directory):
        matched = [m.path for r in FileSystems.match([_join(directory, "*")]) for m in r.metadata_list]
        if matched:
            FileSystems.delete(matched)
    else:
        shutil.rmtree(directory, ignore_errors=True)


def prepare_beam(inputs, output_dir, runner: str = "direct", beam_options: Sequence[str] = (),
                 **settings) -> tuple[DatasetIndex, BeamCounters | None]:
    """`prepare.prepare` on Beam: `settings` are `prepare.plan_job`'s keyword arguments."""
    _import_beam()
    return run_job(plan_job(inputs, output_dir, **settings), runner, beam_options)
