"""Small prepared data sets written straight from in-memory utterances, for tests and benchmarks.

This is not ingestion (`xlsr-jax prepare` handles real audio, bad input and resumable writes); it
only lays out `records.encode_record` shards and the index files exactly as a prepared directory
has them, so the pipeline can be tested and benchmarked without audio files.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import records


def synthetic_utterances(
    num: int,
    seconds: tuple[float, float] = (1.0, 3.0),
    languages: Sequence[str] = ("en",),
    seed: int = 0,
    start_index: int = 0,
) -> list[records.Utterance]:
    """`num` noisy tones; the first sample of utterance i is exactly (start_index + i + 1) / 32768."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        n = int(rng.uniform(*seconds) * records.SAMPLE_RATE)
        t = np.arange(n, dtype=np.float32) / records.SAMPLE_RATE
        audio = 0.1 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.01 * rng.standard_normal(n)
        # A marker that survives int16 quantization lets tests check which record landed where.
        audio[0] = (start_index + i + 1) / 32767.0
        lang = languages[i % len(languages)]
        out.append(
            records.Utterance(f"utt{start_index + i:06d}", audio.astype(np.float32), lang, f"{lang} text {i}")
        )
    return out


def write_prepared_dir(
    data_dir: str | pathlib.Path,
    splits: Mapping[str, Sequence[records.Utterance]],
    codec: str = "pcm16",
    num_shards: int = 2,
    writer_options: str = "group_size:1",
) -> records.DatasetIndex:
    """Writes shards, `dataset.json`, `<split>.lengths.npy` and `<split>.languages.npy`."""
    data_dir = pathlib.Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    languages = sorted({u.language for utts in splits.values() for u in utts})
    lang_id = {code: i for i, code in enumerate(languages)}
    split_index = {}
    for split, utts in splits.items():
        parts = np.array_split(np.arange(len(utts)), num_shards)
        names, counts, lengths, seconds = [], [], [], {}
        for s, part in enumerate(parts):
            name = f"{split}-{s:05d}-of-{num_shards:05d}.array_record"
            writer = ArrayRecordWriter(str(data_dir / name), writer_options)
            for i in part:
                writer.write(records.encode_record(utts[i], codec))
                lengths.append(len(utts[i].audio))
                seconds[utts[i].language] = (
                    seconds.get(utts[i].language, 0.0) + len(utts[i].audio) / records.SAMPLE_RATE
                )
            writer.close()
            names.append(name)
            counts.append(len(part))
        np.save(data_dir / f"{split}.lengths.npy", np.asarray(lengths, np.int32))
        np.save(
            data_dir / f"{split}.languages.npy", np.asarray([lang_id[u.language] for u in utts], np.int16)
        )
        split_index[split] = records.SplitIndex(shards=names, num_records=counts, seconds_by_language=seconds)
    index = records.DatasetIndex(
        codec=codec, languages=languages, splits=split_index, source={"layout": "synthetic"}
    )
    index.save(data_dir)
    return index
