"""`prepare`: audio on disk -> ArrayRecord shards + `dataset.json` (the layout of `records.py`).

Files are decoded in parallel worker processes (spawn), in a fixed order, so the shards are the
same whatever the worker count and whether or not the run was interrupted. Bad files are skipped
with a reason (see `decode.REASONS`), listed in `report.tsv` and counted in `DatasetIndex.skipped`.
The per-split `lengths`/`languages` arrays, `report.tsv` and `dataset.json` are written last, each
atomically, so a directory with a `dataset.json` is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import tqdm

from data_pipelines.audio import SAMPLE_RATE, AudioError
from data_pipelines.errors import UserError
from data_pipelines.ingest.decode import Decoded, Filters, decode_item
from data_pipelines.ingest.layouts import Item, discover, as_path, is_remote
from data_pipelines.ingest.shards import (
    DEFAULT_RECORDS_PER_SHARD,
    ProgressLog,
    ShardPlan,
    ShardResult,
    plan_fingerprint,
    plan_shards,
    write_shard,
)
from data_pipelines.records import CODECS, DatasetIndex, SplitIndex

REPORT_FILE = "report.tsv"
_T = TypeVar("_T")


@contextlib.contextmanager
def _ordered_map(fn: Callable[[Item], _T], items: Sequence[Item], workers: int) -> Iterator[Iterator[_T]]:
    """`map` in `workers` spawn-started processes (in this process for 0), results in input order."""
    if workers == 0 or not items:
        yield map(fn, items)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(items))) as pool:
        # Small chunks: files differ a lot in size, and order is kept by imap anyway.
        yield pool.imap(fn, items, chunksize=max(1, min(8, len(items) // (8 * workers))))


def _atomic_save_npy(path: pathlib.Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def shard_records(plan: ShardPlan, decoded: Iterator[Decoded], result: ShardResult, strict: bool,
                   on_item: Callable[[int], None]) -> Iterable[bytes]:
    """Yields the records of one shard from the decoded stream (in `plan.items` order), filling `result`."""
    for item in plan.items:
        d = next(decoded)
        if d.skip is not None:
            reason, detail = d.skip
            if strict:
                raise AudioError(item.path, f"{reason} ({detail})")
            result.skipped.append([item.path, reason, detail])
        for record, n in zip(d.records, d.lengths):
            result.num_records += 1
            result.lengths.append(n)
            result.languages.append(item.language)
            seconds = result.seconds_by_language
            seconds[item.language] = seconds.get(item.language, 0.0) + n / SAMPLE_RATE
            yield record
        on_item(sum(d.lengths))


def _write_report(output_dir: pathlib.Path, skipped: list[list[str]]) -> None:
    tmp = output_dir / (REPORT_FILE + ".tmp")
    lines = ["path\treason\tdetail"] + ["\t".join(s.replace("\t", " ") for s in row) for row in skipped]
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")  # paths as the disk has them
    os.replace(tmp, output_dir / REPORT_FILE)


def _build_index(output_dir: pathlib.Path, plans: list[ShardPlan], results: dict[str, ShardResult],
                 codec: str, source: dict) -> DatasetIndex:
    languages = sorted({lang for r in results.values() for lang in r.languages})
    lang_id = {lang: i for i, lang in enumerate(languages)}
    splits: dict[str, SplitIndex] = {}
    for split in dict.fromkeys(p.split for p in plans):
        shard_results = [(p.name, results[p.name]) for p in plans if p.split == split]
        seconds: dict[str, float] = {}
        for _, r in shard_results:
            for lang, s in r.seconds_by_language.items():
                seconds[lang] = seconds.get(lang, 0.0) + s
        lengths = [n for _, r in shard_results for n in r.lengths]
        ids = [lang_id[lang] for _, r in shard_results for lang in r.languages]
        _atomic_save_npy(output_dir / f"{split}.lengths.npy", np.asarray(lengths, dtype=np.int32))
        _atomic_save_npy(output_dir / f"{split}.languages.npy", np.asarray(ids, dtype=np.int16))
        splits[split] = SplitIndex(shards=[name for name, _ in shard_results],
                                   num_records=[r.num_records for _, r in shard_results],
                                   seconds_by_language={k: round(v, 3) for k, v in sorted(seconds.items())})
    skipped_rows = [row for p in plans for row in results[p.name].skipped]
    counts: dict[str, int] = {}
    for _, reason, _ in skipped_rows:
        counts[reason] = counts.get(reason, 0) + 1
    _write_report(output_dir, skipped_rows)
    return DatasetIndex(codec=codec, languages=languages, splits=splits, source=source,
                        skipped=dict(sorted(counts.items())))


@dataclasses.dataclass(frozen=True)
class Job:
    """A planned `prepare` run: what goes into which shard, and the settings a resumed run must match."""

    out: pathlib.Path
    plans: list[ShardPlan]
    filters: Filters
    codec: str
    strict: bool
    source: dict  # DatasetIndex.source
    settings: dict  # the progress log's: a resumed run must have the same

    @property
    def num_items(self) -> int:
        return sum(len(p.items) for p in self.plans)


def plan_job(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    layout: str | None = None,
    num_shards: int | None = None,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    codec: str = "pcm16",
    min_seconds: float = 0.5,
    max_seconds: float = 30.0,
    split_long: bool = False,
    split: str | None = None,
    language: str | None = None,
    language_from_parent: bool = False,
    silence_peak: float = 1e-3,
    strict: bool = False,
) -> Job:
    """Discovers the inputs and cuts them into shards (the launcher's part, whatever runs the decoding)."""
    if codec not in CODECS:
        raise UserError(f"unknown codec {codec!r}; choose one of {CODECS}")
    filters = Filters(min_seconds, max_seconds, split_long, silence_peak)
    # Absolute paths: a resumed run may start from another working directory.
    given = [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs
    paths = [as_path(p) if is_remote(p) else pathlib.Path(p).absolute() for p in given]
    items, layouts = discover(paths, layout, split, language, language_from_parent)
    plans = plan_shards(items, num_shards, records_per_shard)
    source = {"inputs": [str(p) for p in paths], "split": split, "language": language,
              "layouts": layouts, "min_seconds": min_seconds, "max_seconds": max_seconds,
              "split_long": split_long, "silence_peak": silence_peak}
    settings = {"codec": codec, "files_and_shards": plan_fingerprint(plans), **source}
    return Job(as_path(output_dir), plans, filters, codec, strict, source, settings)


def finish(job: Job, results: dict[str, ShardResult]) -> DatasetIndex:
    """Writes the lengths/languages arrays, report.tsv and, last, dataset.json from every shard's result."""
    index = _build_index(job.out, job.plans, results, job.codec, job.source)
    if sum(s.total_records for s in index.splits.values()) == 0:
        raise UserError(f"every input was skipped ({index.skipped}); see {job.out / REPORT_FILE}")
    index.save(job.out)
    return index


def prepare(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: bool = True,
    **settings: Any,
) -> DatasetIndex:
    """Ingests `inputs` into `output_dir` (resuming a run there) and returns its `DatasetIndex`.

    `settings`: `plan_job`'s keyword arguments (layout, shards, codec, length filters, split, language,
    strict). `workers` decoding processes (default: every core; 0 decodes in this process).
    """
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 0:
        raise UserError(f"workers must be >= 0, got {workers}")
    if is_remote(output_dir) or any(is_remote(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike))
                                                            else inputs)):
        raise UserError("the local path reads and writes local files; for gs:// use --runner (Apache Beam), "
                        "e.g. --runner direct")
    job = plan_job(inputs, output_dir, **settings)
    out, plans = job.out, job.plans
    log = ProgressLog(out, job.settings)

    results = {p.name: r for p in plans if (r := log.done(p.name)) is not None}
    todo = [p for p in plans if p.name not in results]
    bar = tqdm.tqdm(total=job.num_items, initial=job.num_items - sum(len(p.items) for p in todo), unit="file",
                    desc="prepare", disable=not progress, dynamic_ncols=True)
    start, audio_s = time.perf_counter(), 0.0

    def on_item(samples: int) -> None:
        nonlocal audio_s
        audio_s += samples / SAMPLE_RATE
        hours = audio_s / 3600
        bar.set_postfix_str(f"{hours:.2f} h audio, {hours / max(time.perf_counter() - start, 1e-9):.3f} h/s",
                            refresh=False)
        bar.update(1)

    fn = functools.partial(decode_item, filters=job.filters, codec=job.codec)
    with bar, _ordered_map(fn, [it for p in todo for it in p.items], workers) as decoded:
        for plan in todo:
            result = ShardResult()
            write_shard(out / plan.name, shard_records(plan, decoded, result, job.strict, on_item))
            log.add(plan.name, result)
            results[plan.name] = result
    return finish(job, results)


def summarize(index: DatasetIndex) -> str:
    """One line: records and hours per split, languages, codec, shards, skipped files by reason."""
    parts = []
    for name, s in index.splits.items():
        parts.append(f"{name} {s.total_records} records / {sum(s.seconds_by_language.values()) / 3600:.3f} h "
                     f"in {len(s.shards)} shard(s)")
    skipped = sum(index.skipped.values())
    why = ", ".join(f"{k} {v}" for k, v in index.skipped.items())
    return (f"prepared {'; '.join(parts)}; {len(index.languages)} language(s), codec {index.codec}; "
            f"skipped {skipped} file(s)" + (f" ({why})" if why else ""))
