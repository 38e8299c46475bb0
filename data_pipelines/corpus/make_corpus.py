"""Regenerates the embedded multilingual speech corpus in `speech/` with the espeak-ng synthesizer.

Needs espeak-ng on the PATH (Debian/Ubuntu, as root):

    apt-get update && apt-get install -y espeak-ng

then, from the repository root:

    python -m data_pipelines.corpus.make_corpus

Every sentence of `sentences.SENTENCES` is spoken at a speaking rate (`-s`, words per minute) and
pitch (`-p`, 0-99) drawn from a generator seeded by the utterance id, so reruns give the same
voices. espeak-ng writes 22.05 kHz WAV; each clip is trimmed to 0.1 s of silence on either side,
resampled to 16 kHz mono with `load_audio` and stored as 16-bit FLAC:

    speech/manifest.tsv                  path, language, split, text (path relative to speech/)
    speech/<language>/<split>/<id>.flac  id = <language>_<nnnn>; every 5th sentence goes to dev

`xlsr-jax prepare data_pipelines/corpus/speech OUT` reads it (the `corpus` layout). The outputs
are committed, so a fresh machine needs no apt step; rerun only to change the corpus.
"""

from __future__ import annotations

import pathlib
import random
import shutil
import subprocess
import tempfile
import zlib

import numpy as np
import soundfile

from data_pipelines.audio import SAMPLE_RATE, load_audio
from data_pipelines.corpus import corpus_dir, manifest_path
from data_pipelines.corpus.sentences import SENTENCES

DEV_EVERY = 5  # sentence i goes to dev when i % DEV_EVERY == DEV_EVERY - 1: an 80/20 split
RATE_WPM = (150, 210)
PITCH = (30, 70)
_MARGIN_S = 0.1
_SILENCE = 0.01


def synthesize(voice: str, text: str, rate: int, pitch: int, out_wav: pathlib.Path) -> None:
    """Writes `text` spoken by espeak-ng `voice` to a WAV file."""
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(out_wav), text],
                   check=True)


def trim(wave: np.ndarray) -> np.ndarray:
    """Cuts leading/trailing silence down to a short margin (espeak pads generously)."""
    loud = np.flatnonzero(np.abs(wave) > _SILENCE)
    if loud.size == 0:
        return wave
    margin = int(_MARGIN_S * SAMPLE_RATE)
    return wave[max(0, loud[0] - margin): loud[-1] + 1 + margin]


def main() -> None:
    """Synthesizes every sentence and rewrites `speech/` (FLAC clips and manifest)."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found; install it with: apt-get install -y espeak-ng")
    root = corpus_dir()
    if root.exists():
        shutil.rmtree(root)
    rows = ["path\tlanguage\tsplit\ttext"]
    total_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for language, (voice, sentences) in SENTENCES.items():
            for i, text in enumerate(sentences):
                uid = f"{language}_{i:04d}"
                split = "dev" if i % DEV_EVERY == DEV_EVERY - 1 else "train"
                rng = random.Random(zlib.crc32(uid.encode()))  # stable across Python runs, unlike hash()
                rate, pitch = rng.randint(*RATE_WPM), rng.randint(*PITCH)
                wav = pathlib.Path(tmp) / f"{uid}.wav"
                synthesize(voice, text, rate, pitch, wav)
                wave = trim(load_audio(wav, SAMPLE_RATE))
                rel = pathlib.Path(language) / split / f"{uid}.flac"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                soundfile.write(root / rel, wave, SAMPLE_RATE, subtype="PCM_16", compression_level=1.0)
                rows.append(f"{rel.as_posix()}\t{language}\t{split}\t{text}")
                total_s += len(wave) / SAMPLE_RATE
    manifest_path().write_text("\n".join(rows) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in root.rglob("*"))
    print(f"{len(rows) - 1} utterances, {len(SENTENCES)} languages, {total_s / 60:.1f} min, "
          f"{size / 1e6:.2f} MB in {root}")


if __name__ == "__main__":
    main()
