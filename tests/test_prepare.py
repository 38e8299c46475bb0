"""`prepare` / `xlsr-jax prepare`: corpus counts, round trips, the bad-input report, resume, CLI."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import soundfile
from array_record.python.array_record_module import ArrayRecordReader
from ingest_helpers import tone, write_audio

from data_pipelines.audio import SAMPLE_RATE, AudioError, load_audio
from data_pipelines.corpus import corpus_dir, manifest_path
from data_pipelines.ingest import decode as decode_mod
from data_pipelines.ingest import prepare as prepare_mod
from data_pipelines.ingest.prepare import prepare, summarize
from data_pipelines.records import DatasetIndex, decode_metadata, decode_record
from xlsr_jax.cli import main

_QUANT = 1.0 / 32767 + 1e-6  # one int16 step, plus float rounding


def _records(path: pathlib.Path) -> list[bytes]:
    reader = ArrayRecordReader(str(path))
    try:
        return list(reader.read_all())
    finally:
        reader.close()


def _split_records(out: pathlib.Path, index: DatasetIndex, split: str) -> list[bytes]:
    return [r for shard in index.shard_paths(out, split) for r in _records(shard)]


def _dir_bytes(out: pathlib.Path) -> dict[str, bytes]:
    """Every output that defines the data set (not the resume log)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "progress.jsonl"}


# --- the embedded corpus ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, DatasetIndex]:
    out = tmp_path_factory.mktemp("corpus") / "prepared"
    return out, prepare(corpus_dir(), out, num_shards=3, workers=0, progress=False)


def test_corpus_counts_hours_languages(corpus_out: tuple[pathlib.Path, DatasetIndex]) -> None:
    out, index = corpus_out
    rows = [line.split("\t") for line in manifest_path().read_text().splitlines()[1:]]
    langs = sorted({r[1] for r in rows})
    assert len(langs) >= 8 and index.languages == langs
    assert DatasetIndex.load(out) == index
    assert index.codec == "pcm16" and index.skipped == {}
    assert {name: s.total_records for name, s in index.splits.items()} == {"train": 176, "dev": 44}
    shards = [p.name for p in index.shard_paths(out, "dev")]
    assert shards == [f"dev-0000{k}-of-00003.array_record" for k in range(3)]
    assert index.splits["dev"].num_records == [14, 15, 15]
    for split in ("train", "dev"):
        expected = {lang: sum(soundfile.info(corpus_dir() / r[0]).frames
                              for r in rows if r[1:3] == [lang, split]) / SAMPLE_RATE for lang in langs}
        assert index.splits[split].seconds_by_language == pytest.approx(expected, abs=2e-3)
        lengths, lang_ids = index.lengths(out, split), index.language_ids(out, split)
        assert lengths.dtype == np.int32 and lang_ids.dtype == np.int16
        assert lengths.sum() / SAMPLE_RATE == pytest.approx(sum(expected.values()), abs=1e-6)
        per_language = 16 if split == "train" else 4
        assert np.bincount(lang_ids, minlength=len(langs)).tolist() == [per_language] * len(langs)
    hours = sum(sum(s.seconds_by_language.values()) for s in index.splits.values()) / 3600
    assert 0.05 < hours < 0.2
    assert summarize(index).startswith("prepared dev 44 records / 0.022 h in 3 shard(s); train 176 records")


def test_corpus_records_decode_to_the_source(corpus_out: tuple[pathlib.Path, DatasetIndex]) -> None:
    out, index = corpus_out
    lines = manifest_path().read_text().splitlines()[1:]
    rows = {pathlib.Path(r.split("\t")[0]).stem: r.split("\t") for r in lines}
    records = _split_records(out, index, "dev")
    lengths, lang_ids = index.lengths(out, "dev"), index.language_ids(out, "dev")
    ids = [decode_record(r).id for r in records]
    assert ids == sorted(ids)  # shards hold the split in id order
    for k in range(0, len(records), 5):
        utt = decode_record(records[k])
        path, language, split, text = rows[utt.id]
        source = load_audio(corpus_dir() / path)
        assert (utt.language, utt.text, split) == (language, text, "dev")
        assert index.languages[lang_ids[k]] == language and lengths[k] == source.size
        np.testing.assert_allclose(utt.audio, source, atol=_QUANT)


# --- bad input --------------------------------------------------------------------------------------


def _broken_set(root: pathlib.Path) -> dict[str, str | None]:
    """Files named by what they are; the value is the expected skip reason (None: kept)."""
    root.mkdir(parents=True)
    write_audio(root / "good.wav", seconds=1.0)
    stereo = np.stack([tone(1.0, 44_100), 0.5 * tone(1.0, 44_100)], axis=1)
    soundfile.write(root / "stereo.wav", stereo, 44_100, subtype="PCM_16")
    full = write_audio(root / "full.wav", seconds=1.0).read_bytes()
    (root / "full.wav").unlink()
    (root / "trunc_wav.wav").write_bytes(full[: len(full) // 2])
    flac = write_audio(root / "trunc_flac.flac", seconds=3.0, seed=1).read_bytes()
    (root / "trunc_flac.flac").write_bytes(flac[: len(flac) // 2])
    mp3 = write_audio(root / "trunc_mp3.mp3", seconds=3.0, seed=3).read_bytes()
    (root / "trunc_mp3.mp3").write_bytes(mp3[: len(mp3) // 2])
    (root / "random.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    (root / "zero.wav").write_bytes(b"")
    soundfile.write(root / "no_frames.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    nan = tone(1.0)
    nan[100] = np.nan
    soundfile.write(root / "nan.wav", nan, SAMPLE_RATE, subtype="FLOAT")
    soundfile.write(root / "one_sample.wav", np.array([0.5], np.float32), SAMPLE_RATE)
    write_audio(root / "short.wav", seconds=0.3)
    soundfile.write(root / "silent.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    write_audio(root / "long.wav", seconds=3.0, seed=2)
    return {"good": None, "stereo": None,
            "trunc_wav": "truncated", "trunc_flac": "truncated", "trunc_mp3": "truncated",
            "random": "unreadable", "zero": "empty", "no_frames": "empty", "nan": "non_finite",
            "one_sample": "too_short", "short": "too_short", "silent": "silent", "long": "too_long"}


def test_bad_input_report(tmp_path: pathlib.Path) -> None:
    expected = _broken_set(tmp_path / "in")
    out = tmp_path / "out"
    index = prepare(tmp_path / "in", out, min_seconds=0.5, max_seconds=2.0, workers=0, progress=False)

    report = [line.split("\t") for line in (out / "report.tsv").read_text().splitlines()]
    assert report[0] == ["path", "reason", "detail"]
    got = {pathlib.Path(row[0]).stem: row[1] for row in report[1:]}
    assert got == {k: v for k, v in expected.items() if v is not None}
    assert index.skipped == {"empty": 2, "non_finite": 1, "silent": 1, "too_long": 1, "too_short": 2,
                             "truncated": 3, "unreadable": 1}
    assert "skipped 11 file(s) (empty 2, non_finite 1" in summarize(index)

    utts = {u.id: u for u in map(decode_record, _split_records(out, index, "train"))}
    assert sorted(utts) == ["good", "stereo"] and index.lengths(out, "train").tolist() == [16000, 16000]
    # Multichannel is mixed to mono (channel mean) and resampled, not rejected.
    np.testing.assert_allclose(utts["stereo"].audio, load_audio(tmp_path / "in" / "stereo.wav"), atol=_QUANT)
    assert np.abs(utts["stereo"].audio).max() == pytest.approx(0.75 * 0.3, abs=0.05)


def test_an_unexpected_decoder_error_skips_the_file(tmp_path: pathlib.Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    write_audio(tmp_path / "in" / "a.wav")
    write_audio(tmp_path / "in" / "b.wav", seed=1)
    real = decode_mod.load_audio

    def failing(path, *args):
        if pathlib.Path(path).name == "a.wav":
            raise MemoryError("header claims 2**40 frames")
        return real(path, *args)

    monkeypatch.setattr(decode_mod, "load_audio", failing)
    index = prepare(tmp_path / "in", tmp_path / "out", workers=0, progress=False)
    assert index.skipped == {"unreadable": 1} and index.splits["train"].total_records == 1
    assert "MemoryError: header claims 2**40 frames" in (tmp_path / "out" / "report.tsv").read_text()


def test_split_long_cuts_equal_chunks(tmp_path: pathlib.Path) -> None:
    write_audio(tmp_path / "in" / "long.wav", seconds=5.0)
    (tmp_path / "in" / "long.txt").write_text("a transcript")
    index = prepare(tmp_path / "in", tmp_path / "out", max_seconds=2.0, split_long=True, workers=0,
                    progress=False)
    utts = [decode_record(r) for r in _split_records(tmp_path / "out", index, "train")]
    assert [(u.id, u.audio.size, u.text) for u in utts] == [
        ("long#000", 26667, ""), ("long#001", 26667, ""), ("long#002", 26666, "")]
    whole = load_audio(tmp_path / "in" / "long.wav")
    np.testing.assert_allclose(np.concatenate([u.audio for u in utts]), whole, atol=_QUANT)


def test_strict_fails_on_the_first_bad_file(tmp_path: pathlib.Path) -> None:
    _broken_set(tmp_path / "in")
    out = tmp_path / "out"
    # In id order the first bad file is "long" (good < long < nan < ...).
    with pytest.raises(AudioError, match=r"long\.wav: too_long \(3\.0 s > 2\.0 s\)"):
        prepare(tmp_path / "in", out, max_seconds=2.0, strict=True, workers=0, progress=False)
    assert not (out / "dataset.json").exists() and not list(out.glob("*.tmp"))


def test_every_format_of_the_folder_layout_is_kept(tmp_path: pathlib.Path) -> None:
    for k, ext in enumerate([".wav", ".flac", ".ogg", ".mp3"]):
        rate = [16_000, 22_050, 44_100, 48_000][k]
        write_audio(tmp_path / "in" / f"f{k}{ext}", seconds=1.0, rate=rate, seed=k)
    index = prepare(tmp_path / "in", tmp_path / "out", language="sw", workers=0, progress=False)
    assert index.skipped == {} and index.splits["train"].total_records == 4
    assert index.languages == ["sw"]
    assert index.splits["train"].seconds_by_language["sw"] == pytest.approx(4, abs=0.1)


# --- resume and determinism -------------------------------------------------------------------------


def test_killed_run_resumes_to_the_same_dataset(tmp_path: pathlib.Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = {"split": "dev", "num_shards": 4, "workers": 0, "progress": False}
    reference = prepare(corpus_dir(), tmp_path / "ref", **kwargs)

    # 1. An exception part-way (a crash in this process): finished shards stay, nothing half-written.
    out = tmp_path / "out"
    calls = 0
    real = prepare_mod.decode_item

    def crashing(*args, **kw):
        nonlocal calls
        calls += 1
        if calls == 25:
            raise RuntimeError("simulated crash")
        return real(*args, **kw)

    monkeypatch.setattr(prepare_mod, "decode_item", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(corpus_dir(), out, **kwargs)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == [
        "dev-00000-of-00004.array_record", "dev-00001-of-00004.array_record", "progress.jsonl"]
    first = (out / "dev-00000-of-00004.array_record").stat().st_mtime_ns

    # 2. A kill (no cleanup): a .tmp shard, a complete-looking shard that the log never recorded,
    #    and a torn last log line.
    shutil.copy(tmp_path / "ref" / "dev-00002-of-00004.array_record", out / "dev-00003-of-00004.array_record")
    (out / "dev-00002-of-00004.array_record.tmp").write_bytes(b"partial")
    log = (out / "progress.jsonl").read_text().splitlines()
    assert len(log) == 3  # settings + two shards
    (out / "progress.jsonl").write_text("\n".join(log[:2]) + "\n" + log[2][: len(log[2]) // 2])

    index = prepare(corpus_dir(), out, **{**kwargs, "workers": 2})
    assert index == reference
    assert _dir_bytes(out) == _dir_bytes(tmp_path / "ref")
    assert (out / "dev-00000-of-00004.array_record").stat().st_mtime_ns == first  # skipped, not rewritten
    assert len((out / "progress.jsonl").read_text().splitlines()) == 5

    # 3. Re-running a finished directory changes nothing; other settings are refused.
    assert prepare(corpus_dir(), out, **kwargs) == reference
    with pytest.raises(ValueError, match="other settings .*codec"):
        prepare(corpus_dir(), out, **{**kwargs, "codec": "flac"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not ours")
    with pytest.raises(ValueError, match="not empty and holds no progress.jsonl"):
        prepare(corpus_dir(), tmp_path / "other", **kwargs)


def test_flac_codec_round_trip(tmp_path: pathlib.Path) -> None:
    pcm = prepare(corpus_dir(), tmp_path / "pcm", split="dev", workers=0, progress=False)
    flac = prepare(corpus_dir(), tmp_path / "flac", split="dev", codec="flac", workers=0, progress=False)
    assert flac.codec == "flac" and flac.splits == pcm.splits
    pcm_records = _split_records(tmp_path / "pcm", pcm, "dev")
    flac_records = _split_records(tmp_path / "flac", flac, "dev")
    assert sum(map(len, flac_records)) < 0.8 * sum(map(len, pcm_records))
    for a, b in zip(pcm_records, flac_records):
        assert decode_metadata(b)[0]["codec"] == "flac"
        ua, ub = decode_record(a), decode_record(b)
        assert (ua.id, ua.language, ua.text) == (ub.id, ub.language, ub.text)
        np.testing.assert_array_equal(ua.audio, ub.audio)  # lossless: the same int16 samples


# --- command line -----------------------------------------------------------------------------------


def test_cli_prepare_exit_codes(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    _broken_set(tmp_path / "in")
    out = tmp_path / "out"
    args = ["--max-seconds", "2", "--workers", "0", "--quiet"]
    assert main(["prepare", str(tmp_path / "in"), str(out), *args]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("prepared train 2 records") and "skipped 11 file(s)" in stdout
    assert json.loads((out / "dataset.json").read_text())["skipped"]["truncated"] == 3

    assert main(["prepare", str(tmp_path / "in"), str(tmp_path / "strict"), "--max-seconds", "2", "--strict",
                 "--workers", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xlsr-jax prepare: error: ") and "too_long" in err[0]

    assert main(["prepare", str(tmp_path / "missing"), str(tmp_path / "o2"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zero.wav").write_bytes(b"")
    assert main(["prepare", str(tmp_path / "bad"), str(tmp_path / "o3"), "--workers", "0", "--quiet"]) == 2
    assert "every input was skipped ({'empty': 1})" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: the layout must be one it knows
        main(["prepare", str(tmp_path / "in"), str(tmp_path / "o4"), "--layout", "kaldi"])
    assert exc.value.code == 2
