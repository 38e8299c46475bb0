"""Input pipeline throughput: audio-seconds per second per core, shards -> padded pretraining batches.

    python benchmarks/bench_data.py                      # 2000 utterances of 4-6 s (mean 5 s)
    python benchmarks/bench_data.py --num 500 --batch-size 16

Writes synthetic data to a temp dir in four forms and runs the same pipeline (crop, per-utterance
normalize, 3 length buckets, padding masks, span masks and 100 negatives per masked frame) over
one epoch of each, in one process with no reader threads or workers:

- pcm16 / pcm16-uncompressed / flac: prepared ArrayRecord shards (zstd:3 default, none, FLAC payload)
- naive: one WAV file per utterance read with soundfile, then the same processing

"per core" divides by the process's CPU time (ArrayRecord's batch read may use a few threads);
wall-clock rates are printed beside it. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import soundfile

from data_pipelines import synthetic
from data_pipelines.pipeline import PipelineConfig, make_dataset
from data_pipelines.sources import PreparedSource
from xlsr_jax.tasks.pretraining import PretrainTargets
from xlsr_jax.config import Wav2Vec2Config


class WavFileSource:
    """The naive baseline: one audio file per utterance, decoded with soundfile on every read."""

    def __init__(self, paths: Sequence[pathlib.Path], lengths: np.ndarray):
        self.paths = list(paths)
        self.lengths = np.asarray(lengths, np.int64)  # as a fairseq manifest lists them
        self.language_ids = np.zeros(len(self.paths), np.int32)
        self.languages = [""]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, indices):
        return [(soundfile.read(self.paths[int(i)], dtype="int16")[0], "") for i in indices]


def _time_epoch(source, config: PipelineConfig, targets, num_batches: int) -> dict:
    it = iter(make_dataset(source, config, targets))
    next(it)  # plan the first window outside the timing
    samples = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        batch = next(it)
        samples += int(batch["attention_mask"].sum())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    seconds = samples / 16000
    return {
        "audio_seconds": round(seconds, 1),
        "audio_s_per_cpu_s": round(seconds / cpu, 1),
        "audio_s_per_wall_s": round(seconds / wall, 1),
        "batches_per_s": round(num_batches / wall, 1),
    }


def _time_decode(source, n: int) -> float:
    """Records per CPU-second for reading + decoding alone (no pipeline)."""
    idx = np.random.default_rng(0).permutation(len(source))[:n]
    cpu = time.process_time()
    for start in range(0, n, 16):
        source.read(idx[start : start + 16])
    return round(n / (time.process_time() - cpu), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000, help="utterances")
    parser.add_argument("--seconds", type=float, nargs=2, default=(4.0, 6.0), help="length range (uniform)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--workdir", type=pathlib.Path, default=None, help="default: a temp dir, removed after"
    )
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    root = pathlib.Path(tmp.name if tmp else args.workdir)
    utts = synthetic.synthetic_utterances(args.num, tuple(args.seconds), seed=0)
    t = time.perf_counter()
    sources = {}
    for name, codec, options in [
        ("pcm16", "pcm16", "group_size:1"),
        ("pcm16-uncompressed", "pcm16", "group_size:1,uncompressed"),
        ("flac", "flac", "group_size:1"),
    ]:
        synthetic.write_prepared_dir(
            root / name, {"train": utts}, codec=codec, num_shards=8, writer_options=options
        )
        sources[name] = PreparedSource(root / name, "train")
    wav_dir = root / "wav"
    wav_dir.mkdir(exist_ok=True)
    paths = [wav_dir / f"{u.id}.wav" for u in utts]
    for u, p in zip(utts, paths):
        soundfile.write(p, u.audio, 16000, subtype="PCM_16")
    sources["naive-wav"] = WavFileSource(paths, [len(u.audio) for u in utts])
    print(
        f"wrote {args.num} utterances ({sum(len(u.audio) for u in utts) / 16000 / 3600:.2f} h) "
        f"in 4 forms in {time.perf_counter() - t:.0f} s"
    )

    model = Wav2Vec2Config()  # 100 negatives, mask_length 10
    targets = PretrainTargets(model, mask_prob=0.65)
    config = PipelineConfig(
        batch_size=args.batch_size,
        normalize=True,
        num_buckets=3,
        read_threads=0,
        max_sample_size=320_000,
        min_sample_size=32_000,
    )
    num_batches = args.num // args.batch_size - 1
    results = {}
    for name, source in sources.items():
        results[name] = {
            **_time_epoch(source, config, targets, num_batches),
            "decode_records_per_cpu_s": _time_decode(source, min(400, args.num)),
        }
    if tmp:
        tmp.cleanup()

    header = (
        f"{'source':<20}{'audio-s/s/core':>16}{'audio-s/s wall':>16}{'batches/s':>11}{'decode rec/s':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<20}{r['audio_s_per_cpu_s']:>16,.0f}{r['audio_s_per_wall_s']:>16,.0f}"
            f"{r['batches_per_s']:>11,.1f}{r['decode_records_per_cpu_s']:>14,.0f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "bench_data",
                "utterances": args.num,
                "seconds": list(args.seconds),
                "batch_size": args.batch_size,
                "num_negatives": model.num_negatives,
                "normalize": True,
                "cpu": platform.processor() or platform.machine(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
