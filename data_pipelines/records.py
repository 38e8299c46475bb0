"""The ArrayRecord record format and the `dataset.json` index of a prepared data set.

One record = one utterance:

    [4 bytes little-endian uint32 N][N bytes UTF-8 JSON metadata][audio payload]

metadata: {"id", "language", "text", "num_samples", "codec"}; payload: 16 kHz mono audio as
little-endian int16 PCM ("pcm16", decoded with one `np.frombuffer`) or FLAC bytes ("flac").

A prepared directory:

    DATA_DIR/
      dataset.json                     index (see `DatasetIndex`)
      train-00000-of-00004.array_record ...
      train.lengths.npy                int32 samples per record, in global record order (shard by shard)
      train.languages.npy              int16 language id per record (index into dataset.json "languages")
      report.tsv                       skipped inputs: path, reason
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import struct
from typing import Any

import numpy as np

from data_pipelines.errors import UserError

SAMPLE_RATE = 16_000
CODECS = ("pcm16", "flac")
INDEX_VERSION = 1
_HEADER = struct.Struct("<I")


@dataclasses.dataclass
class Utterance:
    """One decoded record."""

    id: str
    audio: np.ndarray  # float32 [-1, 1], 16 kHz mono
    language: str = ""
    text: str = ""


def encode_record(utt: Utterance, codec: str = "pcm16") -> bytes:
    """Serialize an utterance (float audio is clipped to [-1, 1] and quantized to 16 bits)."""
    if codec not in CODECS:
        raise UserError(f"unknown codec {codec!r}; choose one of {CODECS}")
    pcm = np.clip(np.round(np.asarray(utt.audio, np.float32) * 32767.0), -32768, 32767).astype("<i2")
    if codec == "pcm16":
        payload = pcm.tobytes()
    else:
        import soundfile

        buf = io.BytesIO()
        soundfile.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        payload = buf.getvalue()
    meta = json.dumps(
        {"id": utt.id, "language": utt.language, "text": utt.text, "num_samples": int(pcm.size), "codec": codec},
        ensure_ascii=False,
    ).encode("utf-8")
    return _HEADER.pack(len(meta)) + meta + payload


def decode_metadata(record: bytes) -> tuple[dict[str, Any], memoryview]:
    """(metadata, payload view) without decoding the audio."""
    view = memoryview(record)
    (n,) = _HEADER.unpack_from(view, 0)
    meta = json.loads(bytes(view[_HEADER.size : _HEADER.size + n]))
    return meta, view[_HEADER.size + n :]


def decode_record(record: bytes) -> Utterance:
    """Bytes -> Utterance with float32 audio in [-1, 1]."""
    meta, payload = decode_metadata(record)
    if meta["codec"] == "pcm16":
        pcm = np.frombuffer(payload, dtype="<i2")
    elif meta["codec"] == "flac":
        import soundfile

        pcm, _ = soundfile.read(io.BytesIO(bytes(payload)), dtype="int16")
    else:
        raise UserError(f"record {meta.get('id')!r} has unknown codec {meta['codec']!r}")
    audio = pcm.astype(np.float32) * (1.0 / 32768.0)
    return Utterance(id=meta["id"], audio=audio, language=meta.get("language", ""), text=meta.get("text", ""))


@dataclasses.dataclass
class SplitIndex:
    shards: list[str]  # file names relative to the data directory, in global record order
    num_records: list[int]  # per shard
    seconds_by_language: dict[str, float]

    @property
    def total_records(self) -> int:
        return int(sum(self.num_records))


@dataclasses.dataclass
class DatasetIndex:
    """Contents of dataset.json."""

    codec: str
    languages: list[str]  # language id -> code
    splits: dict[str, SplitIndex]
    sample_rate: int = SAMPLE_RATE
    version: int = INDEX_VERSION
    source: dict[str, Any] = dataclasses.field(default_factory=dict)  # how it was made (layout, filters)
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count

    def save(self, data_dir: str | pathlib.Path) -> None:
        path = pathlib.Path(data_dir) / "dataset.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half an index

    @classmethod
    def load(cls, data_dir: str | pathlib.Path) -> "DatasetIndex":
        path = pathlib.Path(data_dir) / "dataset.json"
        if not path.is_file():
            raise FileNotFoundError(f"{data_dir} is not a prepared data set: no dataset.json (run xlsr-jax prepare)")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is corrupt ({e}); run xlsr-jax prepare again") from e
        if data.get("version") != INDEX_VERSION:
            raise UserError(f"{path}: index version {data.get('version')} is not {INDEX_VERSION}")
        data["splits"] = {name: SplitIndex(**s) for name, s in data["splits"].items()}
        return cls(**data)

    def shard_paths(self, data_dir: str | pathlib.Path, split: str) -> list[pathlib.Path]:
        if split not in self.splits:
            raise UserError(f"split {split!r} not in the data set {data_dir}; it has {sorted(self.splits)}")
        return [pathlib.Path(data_dir) / s for s in self.splits[split].shards]

    def lengths(self, data_dir: str | pathlib.Path, split: str) -> np.ndarray:
        """Samples per record of `split`, in global record order (for length bucketing)."""
        return np.load(pathlib.Path(data_dir) / f"{split}.lengths.npy")

    def language_ids(self, data_dir: str | pathlib.Path, split: str) -> np.ndarray:
        return np.load(pathlib.Path(data_dir) / f"{split}.languages.npy")
