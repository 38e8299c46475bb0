"""`prepare` over a folder of more than 200 generated bad inputs mixed with good ones: no crash, every bad
input in report.tsv with one of the known reasons, every good input a record."""

import os
import pathlib

import numpy as np
import soundfile

from data_pipelines.ingest.decode import REASONS
from data_pipelines.ingest.prepare import prepare
from data_pipelines.records import decode_record
from ingest_helpers import tone, write_audio

FORMATS = (".wav", ".flac", ".ogg", ".mp3")


def _good(root: pathlib.Path) -> set[str]:
    """Files that must become records: every format and odd rates, 1-8 channels, names that are not
    UTF-8, FLAC bytes behind a .wav name, a link to a good file."""
    good = []
    for k, ext in enumerate(FORMATS):
        for rate in (8_000, 22_050, 48_000):
            good.append(write_audio(root / f"good/r{rate}_{k}{ext}", seconds=1.0, rate=rate, seed=k))
    for channels in (2, 3, 8):
        wave = np.stack([tone(1.0, seed=c) for c in range(channels)], axis=1)
        path = root / f"good/ch{channels}.wav"
        soundfile.write(path, wave, 16_000, subtype="PCM_16")
        good.append(path)
    good.append(write_audio(root / "good/r96k.flac", seconds=1.0, rate=96_000, seed=7))
    for raw in (b"good/caf\xe9.wav", b"good/\xff\xfe.flac"):
        path = pathlib.Path(os.fsdecode(bytes(root) + b"/" + raw))
        with open(path, "wb") as f:  # soundfile cannot open such a name itself
            soundfile.write(f, tone(1.0, seed=len(raw)), 16_000, format=path.suffix[1:].upper(), subtype="PCM_16")
        good.append(path)
    flac_as_wav = root / "good/flac_inside.wav"
    flac_as_wav.write_bytes(write_audio(root / "good/tmp.flac", seconds=1.0, seed=9).read_bytes())
    (root / "good/tmp.flac").unlink()
    good.append(flac_as_wav)
    link = root / "good/link.wav"
    link.symlink_to(good[0])
    good.append(link)
    return {str(p) for p in good}


def _bad(root: pathlib.Path) -> set[str]:
    """Inputs that must be skipped and reported, >= 200 of them."""
    bad = []
    rng = np.random.default_rng(0)
    out = root / "bad"
    out.mkdir(parents=True)
    sources = {ext: write_audio(root / f"src/s{ext}", seconds=2.0, seed=3).read_bytes() for ext in FORMATS}

    def put(name: str, data: bytes) -> None:  # ids are paths without the extension: keep it in the name
        path = out / f"{name}_{pathlib.Path(name).suffix[1:]}{pathlib.Path(name).suffix}"
        path.write_bytes(data)
        bad.append(path)

    for ext, data in sources.items():  # headers cut short: 12 per format
        for cut in (1, 2, 3, 4, 6, 8, 11, 12, 16, 20, 24, 30):
            put(f"head{cut}{ext}", data[:cut])
    for ext in (".wav", ".flac"):  # bodies cut: 24
        data = sources[ext]
        for cut in np.linspace(0.2, 0.9, 12):
            put(f"body{cut:.2f}{ext}", data[: int(len(data) * cut)])
    for ext in (".wav", ".flac", ".ogg"):  # random bytes behind an audio name: 42
        for seed in range(14):
            put(f"random{seed}{ext}", rng.bytes(int(rng.integers(1, 20_000))))
    magics = {".wav": (0, 8, 12), ".flac": (0,), ".ogg": (0,)}  # the format's magic bytes corrupted: 30
    for ext, offsets in magics.items():
        for offset in offsets:
            for k in range(6):
                data = bytearray(sources[ext])
                data[offset + k % 4] ^= 0xFF  # one or two magic bytes inverted
                data[offset + (k + k // 4) % 4] ^= 0xFF if k >= 4 else 0
                put(f"magic{offset}_{k}{ext}", bytes(data))
    for ext in FORMATS:  # zero bytes: 20
        for k in range(5):
            put(f"zero{k}{ext}", b"")
    for k in range(20):  # NaN and inf samples: 20
        wave = tone(1.0, seed=k)
        wave[int(rng.integers(0, wave.size))] = (np.nan, np.inf, -np.inf)[k % 3]
        soundfile.write(out / f"nonfinite{k}.wav", wave, 16_000, subtype="FLOAT")
        bad.append(out / f"nonfinite{k}.wav")
    for k in range(10):  # text behind an audio name: 10
        put(f"text{k}{FORMATS[k % 4]}", f"this is not audio {k}\n".encode() * (k + 1))
    for k in range(10):  # too short (0.1 s) and silent: 20
        write_audio(out / f"short{k}.wav", seconds=0.1, seed=k)
        soundfile.write(out / f"silent{k}.flac", np.zeros(16_000, np.float32), 16_000, subtype="PCM_16")
        bad += [out / f"short{k}.wav", out / f"silent{k}.flac"]
    for k in range(5):  # links to nothing and links to themselves: 10
        (out / f"dangling{k}.wav").symlink_to(out / f"missing{k}.wav")
        (out / f"loop{k}.flac").symlink_to(out / f"loop{k}.flac")
        bad += [out / f"dangling{k}.wav", out / f"loop{k}.flac"]
    for k in range(5):  # good audio with a transcript that is not UTF-8: 5
        write_audio(out / f"latin{k}.wav", seconds=1.0, seed=k)
        (out / f"latin{k}.txt").write_bytes(f"caf\xe9 {k}".encode("latin-1"))
        bad.append(out / f"latin{k}.wav")
    (out / "loopdir").symlink_to(out)  # a directory that contains itself: discovery must not recurse forever
    return {str(p) for p in bad}


def test_two_hundred_bad_inputs_are_reported_and_every_good_one_is_kept(tmp_path):
    root = tmp_path / "in"
    good, bad = _good(root), _bad(root)
    for leftover in (root / "src").iterdir():
        leftover.unlink()
    assert len(bad) >= 200, len(bad)

    index = prepare(root, tmp_path / "out", min_seconds=0.5, max_seconds=5.0, workers=0, progress=False)

    lines = (tmp_path / "out" / "report.tsv").read_bytes().decode("utf-8", "surrogateescape").splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    reported = {row[0]: row[1] for row in rows}
    assert set(reported) == bad, (sorted(set(reported) - bad)[:5], sorted(bad - set(reported))[:5])
    assert set(reported.values()) <= set(REASONS) and all(row[2] for row in rows)
    assert sum(index.skipped.values()) == len(bad)
    split = index.splits["train"]
    assert split.total_records == len(good)
    ids = sorted(decode_record(r).id for r in _records(tmp_path / "out", index))
    assert len(ids) == len(set(ids)) == len(good)
    assert "good/caf\\xe9" in ids and "good/\\xff\\xfe" in ids


def _records(out, index):
    from array_record.python.array_record_module import ArrayRecordReader

    for path in index.shard_paths(out, "train"):
        reader = ArrayRecordReader(str(path))
        yield from reader.read_all()
        reader.close()


def test_a_manifest_that_is_not_utf8_is_one_line_naming_it(tmp_path, capsys):
    from xlsr_jax.cli import main

    write_audio(tmp_path / "in" / "a.wav")
    manifest = tmp_path / "in" / "manifest.tsv"
    manifest.write_bytes("path\tlanguage\tsplit\ttext\na.wav\tfr\ttrain\tcaf\xe9\n".encode("latin-1"))
    code = main(["prepare", str(manifest), str(tmp_path / "out"), "--layout", "corpus"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"{manifest} is not UTF-8 text" in err[0] and "iconv" in err[0]
    assert not (tmp_path / "out" / "dataset.json").exists()
