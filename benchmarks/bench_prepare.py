"""`prepare` throughput, local processes against Apache Beam's DirectRunner: hours of audio per minute.

    python benchmarks/bench_prepare.py                  # 10 copies of the embedded corpus (2,200 files, ~1.1 h)
    python benchmarks/bench_prepare.py --copies 4 --rate 48000 --modes local-2,beam-mp-2

The input is the embedded espeak-ng corpus (real FLAC speech) copied `--copies` times into one folder,
re-encoded at `--rate` (16000 keeps the files as they are; another rate adds resampling to the work).
Each mode prepares it into a fresh directory with the same shards (`--num-shards`); every output is
checked equal, file for file, to the first mode's. Modes: local-N (`prepare(workers=N)`, N=0 decodes
in this process), beam-N (DirectRunner, N threads: `direct_running_mode=multi_threading`) and
beam-mp-N (DirectRunner, N processes: `multi_processing`). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
import soundfile

from data_pipelines.audio import load_audio
from data_pipelines.corpus import corpus_dir
from data_pipelines.ingest.beam import run_job
from data_pipelines.ingest.prepare import plan_job, prepare


def make_input(root: pathlib.Path, copies: int, rate: int) -> int:
    """Writes the corpus `copies` times under `root` at `rate`; returns the number of files."""
    import soxr

    files = sorted(corpus_dir().glob("*/*/*.flac"))
    n = 0
    for path in files:
        audio = load_audio(path)
        if rate != 16000:
            audio = soxr.resample(audio, 16000, rate).astype(np.float32)
        for c in range(copies):
            out = root / f"copy{c:02d}" / path.parent.parent.name / path.name
            out.parent.mkdir(parents=True, exist_ok=True)
            soundfile.write(out, audio, rate, subtype="PCM_16")
            n += 1
    return n


def run_mode(mode: str, inputs: pathlib.Path, out: pathlib.Path, num_shards: int) -> tuple[float, float]:
    """(wall seconds, hours of audio written)."""
    t0 = time.perf_counter()
    if mode.startswith("local-"):
        index = prepare(inputs, out, workers=int(mode.split("-")[1]), progress=False, num_shards=num_shards,
                        split="train")
    else:
        workers = int(mode.split("-")[-1])
        running = "multi_processing" if mode.startswith("beam-mp-") else "multi_threading"
        job = plan_job(inputs, out, num_shards=num_shards, split="train")
        index, _ = run_job(job, "direct", [f"--direct_num_workers={workers}", f"--direct_running_mode={running}"])
    wall = time.perf_counter() - t0
    return wall, sum(index.splits["train"].seconds_by_language.values()) / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--rate", type=int, default=16000)
    parser.add_argument("--num-shards", type=int, default=8)
    parser.add_argument("--modes", default="local-0,local-2,beam-1,beam-2,beam-mp-2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        files = make_input(tmp / "in", args.copies, args.rate)
        rows, first = [], None
        for mode in args.modes.split(","):
            out = tmp / mode
            wall, hours = run_mode(mode, tmp / "in", out, args.num_shards)
            if first is None:
                first = out
            else:  # every mode writes the same data set
                names = sorted(p.name for p in first.iterdir())
                assert names == sorted(p.name for p in out.iterdir()), mode
                assert all(filecmp.cmp(first / n, out / n, shallow=False) for n in names), mode
            rows.append({"mode": mode, "wall_s": round(wall, 2), "files_per_s": round(files / wall, 1),
                         "audio_hours": round(hours, 4), "hours_per_minute": round(hours / wall * 60, 3)})
    print(f"{files} files ({args.copies} copies of the embedded corpus at {args.rate} Hz), "
          f"{args.num_shards} shards, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print(f"{'mode':<12}{'wall s':>9}{'files/s':>10}{'audio h':>9}{'h audio/min':>13}")
    for r in rows:
        print(f"{r['mode']:<12}{r['wall_s']:>9}{r['files_per_s']:>10}{r['audio_hours']:>9}{r['hours_per_minute']:>13}")
    print(json.dumps({"benchmark": "prepare", "files": files, "rate": args.rate, "rows": rows}))


if __name__ == "__main__":
    main()
