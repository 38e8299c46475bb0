"""Random-access utterance sources the grain pipeline reads: prepared ArrayRecord shards, or any
other store that gives audio, text and a length per record (see `tfds_builder.TfdsAudioSource`).
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Sequence
from typing import Protocol

import grain
import numpy as np

from data_pipelines import records
from data_pipelines.errors import UserError


class AudioSource(Protocol):
    """What the pipeline needs from a data set: lengths up front, then records by index."""

    lengths: np.ndarray  # [N] samples per record (16 kHz), for filtering and bucketing
    language_ids: np.ndarray  # [N] int index into `languages`
    languages: list[str]

    def __len__(self) -> int: ...

    def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, str]]:
        """(mono 16 kHz audio as int16 PCM or float32 in [-1, 1], transcript) per index."""
        ...


def pcm16_payload(meta: dict, payload: memoryview) -> np.ndarray:
    """The int16 samples of a record payload, without the float conversion of `decode_record`."""
    # Cropping happens on int16 so that only the kept samples are converted to float.
    if meta["codec"] == "pcm16":
        return np.frombuffer(payload, dtype="<i2")
    if meta["codec"] == "flac":
        import soundfile

        pcm, _ = soundfile.read(io.BytesIO(bytes(payload)), dtype="int16")
        return pcm
    raise UserError(f"record {meta.get('id')!r} has unknown codec {meta['codec']!r}")


class UnreadableRecordError(UserError):
    """A record of a prepared shard failed its checksum or could not be parsed."""

    def __init__(self, shard: pathlib.Path, record: int, cause: Exception):
        self.shard, self.record = shard, record
        super().__init__(f"{shard}: record {record} cannot be read ({cause}); restore the shard or run "
                         "xlsr-jax prepare again")


def check_shard(path: pathlib.Path, expected_records: int) -> None:
    """Raise a UserError naming `path` if the shard is missing, unreadable (e.g. truncated: ArrayRecord
    keeps its index in a footer) or holds another number of records than dataset.json says."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not path.is_file():
        raise UserError(f"{path}: shard missing (dataset.json lists it); restore it or run xlsr-jax prepare again")
    try:
        reader = ArrayRecordReader(str(path))
        count = reader.num_records()
        reader.close()
    except Exception as e:  # the C++ reader raises RuntimeError/ValueError subtypes by version
        raise UserError(f"{path}: unreadable shard ({e}); restore it or run xlsr-jax prepare again") from e
    if count != expected_records:
        raise UserError(f"{path}: {count} records, but dataset.json says {expected_records}; the shard or the "
                        "index was changed after prepare: restore it or run xlsr-jax prepare again")


class PreparedSource:
    """One split of a prepared directory, read with `grain.sources.ArrayRecordDataSource`."""

    def __init__(self, data_dir: str | pathlib.Path, split: str):
        index = records.DatasetIndex.load(data_dir)
        paths = index.shard_paths(data_dir, split)
        for path, expected in zip(paths, index.splits[split].num_records):
            check_shard(path, expected)
        self.records = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
        self._shards = paths
        self._shard_starts = np.cumsum([0, *index.splits[split].num_records])
        self.lengths = index.lengths(data_dir, split).astype(np.int64)
        self.language_ids = index.language_ids(data_dir, split).astype(np.int32)
        self.languages = list(index.languages)
        if not (len(self.records) == len(self.lengths) == len(self.language_ids)):
            raise UserError(
                f"{data_dir} split {split!r}: {len(self.records)} records in the shards but "
                f"{len(self.lengths)} lengths and {len(self.language_ids)} language ids in the index files"
            )

    def __len__(self) -> int:
        return len(self.lengths)

    def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, str]]:
        out = []
        # One record at a time: ArrayRecordDataSource.__getitems__ starts a thread pool per call,
        # which costs more than it saves for a batch of a few dozen records.
        for i in indices:
            try:
                raw = self.records[int(i)]
            except RuntimeError as e:  # riegeli checks every chunk's hash: a flipped byte is caught here
                raise self._unreadable(int(i), e) from e
            try:
                meta, payload = records.decode_metadata(raw)
                pcm = pcm16_payload(meta, payload)
            except Exception as e:  # a record that passed the checksum but does not parse: written wrongly
                raise self._unreadable(int(i), e) from e
            if len(pcm) != self.lengths[i]:  # the batch plan padded and bucketed by the index's length
                raise self._unreadable(int(i), ValueError(f"{len(pcm)} samples, the index says {self.lengths[i]}"))
            out.append((pcm, meta.get("text", "")))
        return out

    def _unreadable(self, i: int, cause: Exception) -> UnreadableRecordError:
        shard = int(np.searchsorted(self._shard_starts, i, side="right")) - 1
        return UnreadableRecordError(self._shards[shard], i - int(self._shard_starts[shard]), cause)
