"""Shard plan, atomic shard writing and the resume log of `prepare`.

Items are sorted by (split, id) and cut into contiguous shards, so the same inputs and shard count
always give the same shards. A shard is written as `NAME.tmp` and renamed when complete; only then
is it appended to `progress.jsonl` (one JSON line per finished shard, after a first line with the
run's settings). A shard counts as finished when both hold: it is in the log and the file under its
final name has the logged record count. Everything else is (re)written on the next run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
from collections.abc import Iterable
from typing import Any

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data_pipelines.errors import UserError
from data_pipelines.ingest.layouts import Item

PROGRESS_FILE = "progress.jsonl"
DEFAULT_RECORDS_PER_SHARD = 2000
# Uncompressed: int16 PCM reads ~4x faster without zstd, and FLAC payloads do not compress further.
# group_size:1 keeps every record independently addressable for random access.
WRITER_OPTIONS = "group_size:1,uncompressed"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    split: str
    name: str  # file name inside the output directory
    items: tuple[Item, ...]


@dataclasses.dataclass
class ShardResult:
    """What the index needs from a finished shard, kept in the log so resuming skips decoding."""

    num_records: int = 0
    lengths: list[int] = dataclasses.field(default_factory=list)
    languages: list[str] = dataclasses.field(default_factory=list)
    seconds_by_language: dict[str, float] = dataclasses.field(default_factory=dict)
    skipped: list[list[str]] = dataclasses.field(default_factory=list)  # [path, reason, detail]


def plan_shards(items: list[Item], num_shards: int | None = None,
                records_per_shard: int = DEFAULT_RECORDS_PER_SHARD) -> list[ShardPlan]:
    """Contiguous shards per split over items sorted by (split, id); never more shards than items."""
    if num_shards is not None and num_shards < 1:
        raise UserError(f"num_shards must be positive, got {num_shards}")
    if records_per_shard < 1:
        raise UserError(f"records_per_shard must be positive, got {records_per_shard}")
    items = sorted(items, key=lambda it: (it.split, it.id))
    plans = []
    for split in sorted({it.split for it in items}):
        if not _SPLIT_NAME.fullmatch(split):
            raise UserError(f"split name {split!r} cannot name a file; use letters, digits, '.', '_' or '-'")
        group = [it for it in items if it.split == split]
        n = len(group)
        count = max(1, min(n, num_shards or math.ceil(n / records_per_shard)))
        for k in range(count):
            name = f"{split}-{k:05d}-of-{count:05d}.array_record"
            plans.append(ShardPlan(split, name, tuple(group[k * n // count: (k + 1) * n // count])))
    return plans


def plan_fingerprint(plans: list[ShardPlan]) -> str:
    """Hash of which file goes to which shard: a resumed run must continue the same plan."""
    h = hashlib.sha256()
    for plan in plans:
        items = [[it.id, it.path, it.language, it.text] for it in plan.items]
        h.update(json.dumps([plan.name, items]).encode())
    return h.hexdigest()


def write_shard(path: pathlib.Path, records: Iterable[bytes], tmp_suffix: str = ".tmp") -> None:
    """Writes records to `path` + `tmp_suffix`, renaming it to `path` only once every record is written."""
    tmp = path.with_name(path.name + tmp_suffix)
    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    try:
        for record in records:
            writer.write(record)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, path)


def count_records(path: pathlib.Path) -> int:
    reader = ArrayRecordReader(str(path))
    try:
        return int(reader.num_records())
    finally:
        reader.close()


class ProgressLog:
    """Append-only record of finished shards in `output_dir/progress.jsonl`."""

    def __init__(self, output_dir: pathlib.Path, settings: dict[str, Any]) -> None:
        self.dir = output_dir
        self.path = output_dir / PROGRESS_FILE
        self.finished: dict[str, ShardResult] = {}
        if self.path.is_file():
            self._load(settings)
        else:
            if output_dir.exists() and any(output_dir.iterdir()):
                raise UserError(f"output directory {output_dir} is not empty and holds no {PROGRESS_FILE} "
                                 f"of an earlier prepare run; choose a new or empty directory")
            output_dir.mkdir(parents=True, exist_ok=True)
            self._rewrite([{"settings": settings}])

    def _load(self, settings: dict[str, Any]) -> None:
        lines = self.path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line torn by a kill: that shard is redone
        old = entries[0].get("settings") if entries else None
        if old != settings:
            changed = sorted(k for k in (settings | (old or {})) if (old or {}).get(k) != settings.get(k))
            raise UserError(f"{self.dir} holds a prepare run with other settings ({', '.join(changed)} "
                             f"differ); rerun with the same ones to resume, or use a new directory")
        for entry in entries[1:]:
            self.finished[entry["shard"]] = ShardResult(**entry["result"])
        if len(entries) != len(lines):
            self._rewrite(entries)

    def _rewrite(self, entries: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries), encoding="utf-8",
                       errors="surrogateescape")
        os.replace(tmp, self.path)

    def done(self, name: str) -> ShardResult | None:
        """The logged result of shard `name` if its file is complete, else None."""
        result = self.finished.get(name)
        path = self.dir / name
        if result is None or not path.is_file() or count_records(path) != result.num_records:
            return None
        return result

    def add(self, name: str, result: ShardResult) -> None:
        self.finished[name] = result
        # surrogateescape: paths that are not UTF-8 (a file system's raw bytes) are written back as they were
        with self.path.open("a", encoding="utf-8", errors="surrogateescape") as f:
            entry = {"shard": name, "result": dataclasses.asdict(result)}
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
