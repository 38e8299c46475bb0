"""Regenerates the bundled speech clips in `samples/` with the espeak-ng synthesizer.

Needs espeak-ng on the PATH (Debian/Ubuntu, as root):

    apt-get update && apt-get install -y espeak-ng

then, from the repository root:

    python -m data_pipelines.corpus.make_samples

espeak-ng writes 22.05 kHz mono WAV; each clip is resampled to 16 kHz with `load_audio` and stored
as 16-bit FLAC, next to `transcripts.tsv` (file, language, text). The outputs are committed, so
this only needs rerunning to change the clips.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import tempfile

import soundfile

from data_pipelines.audio import SAMPLE_RATE, load_audio
from data_pipelines.corpus import SAMPLES_DIR, TRANSCRIPTS

# (file stem, language code, espeak-ng voice, text)
UTTERANCES = [
    ("en_0001", "en", "en", "the quick brown fox jumps over the lazy dog"),
    ("de_0001", "de", "de", "guten morgen, wie geht es dir"),
    ("cmn_0001", "cmn", "cmn-latn-pinyin", "ni3 hao3 shi4 jie4"),
]


def synthesize(voice: str, text: str, out_wav: pathlib.Path) -> None:
    """Writes `text` spoken by espeak-ng `voice` to a WAV file."""
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(out_wav), text], check=True)


def main() -> None:
    """Synthesizes every utterance and rewrites the FLAC clips and the transcript table."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found; install it with: apt-get install -y espeak-ng")
    SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    rows = ["file\tlanguage\ttext"]
    with tempfile.TemporaryDirectory() as tmp:
        for stem, language, voice, text in UTTERANCES:
            wav = pathlib.Path(tmp) / f"{stem}.wav"
            synthesize(voice, text, wav)
            wave = load_audio(wav, SAMPLE_RATE)
            flac = SAMPLES_DIR / f"{stem}.flac"
            # PCM_16 matches the source depth; a float subtype would only add bytes.
            soundfile.write(flac, wave, SAMPLE_RATE, subtype="PCM_16", compression_level=1.0)
            rows.append(f"{flac.name}\t{language}\t{text}")
            print(f"{flac}: {len(wave) / SAMPLE_RATE:.2f} s, {flac.stat().st_size} bytes")
    TRANSCRIPTS.write_text("\n".join(rows) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
