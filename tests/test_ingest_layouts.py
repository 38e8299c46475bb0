"""Input layouts of `xlsr-jax prepare`: each one read from a tiny generated example, and detection."""

from __future__ import annotations

import pathlib

import pytest
from ingest_helpers import write_audio

from data_pipelines.corpus import corpus_dir, manifest_path
from data_pipelines.ingest.layouts import Item, detect_layout, discover

_CV_HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tvariant\tlocale\tsegment"


def _by_id(items: list[Item]) -> dict[str, Item]:
    return {it.id: it for it in items}


def _folder(root: pathlib.Path) -> pathlib.Path:
    write_audio(root / "en" / "x.wav", seed=0)
    (root / "en" / "x.txt").write_text("hello world\n")
    write_audio(root / "en" / "w.mp3", seed=1)
    write_audio(root / "de" / "y.flac", seed=2)
    write_audio(root / "de" / "sub" / "z.ogg", seed=3)
    (root / "README.md").write_text("not audio")
    return root


def test_folder_layout(tmp_path: pathlib.Path) -> None:
    root = _folder(tmp_path / "audio")
    assert detect_layout(root) == "folder"
    items, layouts = discover(root, language_from_parent=True)
    assert layouts == ["folder"]
    assert [it.id for it in items] == ["de/sub/z", "de/y", "en/w", "en/x"]
    by_id = _by_id(items)
    assert {i: it.language for i, it in by_id.items()} == {
        "de/sub/z": "sub", "de/y": "de", "en/w": "en", "en/x": "en"}
    assert by_id["en/x"].text == "hello world" and by_id["de/y"].text == ""
    assert {it.split for it in items} == {"train"}
    assert pathlib.Path(by_id["de/sub/z"].path) == root / "de" / "sub" / "z.ogg"

    items, _ = discover(root, split="dev", language="sw")
    assert {(it.split, it.language) for it in items} == {("dev", "sw")}
    # One audio file is a folder of one.
    items, layouts = discover(root / "en" / "x.wav")
    assert layouts == ["folder"]
    assert [(it.id, it.language, it.text) for it in items] == [("x", "und", "hello world")]


def test_fairseq_layout(tmp_path: pathlib.Path) -> None:
    audio = tmp_path / "audio"
    for name in ["a/1.flac", "a/2.flac", "b/3.wav"]:
        write_audio(audio / name, seconds=0.6)
    man = tmp_path / "manifest"
    man.mkdir()
    (man / "train.tsv").write_text(f"{audio}\na/1.flac\t9600\na/2.flac\t9600\n")
    (man / "train.wrd").write_text("first words\nsecond words\n")
    # A relative root is taken relative to the manifest; .ltr letters become words.
    (man / "valid.tsv").write_text("../audio\nb/3.wav\t9600\n")
    (man / "valid.ltr").write_text("H I | T H E R E |\n")
    (man / "notes.tsv").write_text("a\tb\tc\n")  # a table, not a manifest: ignored

    assert detect_layout(man) == "fairseq" and detect_layout(man / "train.tsv") == "fairseq"
    items, _ = discover(man, language="en")
    assert [(it.split, it.id, it.text, it.language) for it in items] == [
        ("train", "a/1", "first words", "en"),
        ("train", "a/2", "second words", "en"),
        ("valid", "b/3", "HI THERE", "en")]
    assert pathlib.Path(items[2].path).resolve() == (audio / "b/3.wav").resolve()

    items, _ = discover(man / "train.tsv", split="pretrain")
    assert [(it.split, it.id) for it in items] == [("pretrain", "a/1"), ("pretrain", "a/2")]
    items, _ = discover(man, split="valid")
    assert [it.id for it in items] == ["b/3"]

    (man / "train.wrd").write_text("only one line\n")
    with pytest.raises(ValueError, match="1 transcript lines for 2 manifest entries"):
        discover(man)


def test_commonvoice_layout(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "cv" / "pt"
    for name in ["c1.mp3", "c2.mp3", "c3.mp3"]:
        write_audio(root / "clips" / name, seconds=0.7, rate=48_000)
    (root / "train.tsv").write_text(
        f"{_CV_HEADER}\n"
        "u1\tc1.mp3\tOlá, \"mundo\"!\t2\t0\t\t\t\t\tpt\t\n"
        "u2\tc2.mp3\tBom dia.\t2\t0\t\t\t\t\tpt\t\n")
    (root / "dev.tsv").write_text(f"{_CV_HEADER}\nu3\tc3.mp3\tBoa noite.\t2\t0\t\t\t\t\tpt\t\n")
    (root / "validated.tsv").write_text(f"{_CV_HEADER}\n")  # superset tables are not read

    assert detect_layout(root) == "commonvoice"
    items, _ = discover(root)
    assert [(it.split, it.id, it.language, it.text) for it in items] == [
        ("dev", "c3", "pt", "Boa noite."),
        ("train", "c1", "pt", 'Olá, "mundo"!'),
        ("train", "c2", "pt", "Bom dia.")]
    assert pathlib.Path(items[0].path) == root / "clips" / "c3.mp3"

    # Old releases have no locale column: the directory is named after the locale.
    (root / "dev.tsv").write_text("client_id\tpath\tsentence\nu3\tc3.mp3\tBoa noite.\n")
    items, _ = discover(root, split="dev")
    assert [(it.id, it.language) for it in items] == [("c3", "pt")]


def test_librispeech_layout(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "LibriSpeech"
    for subset, spk, chap, n in [("train-clean-100", "103", "1240", 2), ("dev-clean", "84", "121123", 1)]:
        chapter = root / subset / spk / chap
        lines = []
        for i in range(n):
            uid = f"{spk}-{chap}-{i:04d}"
            write_audio(chapter / f"{uid}.flac", seconds=0.6, seed=i)
            lines.append(f"{uid} WORDS OF UTTERANCE {i}")
        (chapter / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")

    assert detect_layout(root) == "librispeech" and detect_layout(root / "dev-clean") == "librispeech"
    items, _ = discover(root)
    assert [(it.split, it.id, it.language, it.text) for it in items] == [
        ("dev-clean", "84-121123-0000", "en", "WORDS OF UTTERANCE 0"),
        ("train-clean-100", "103-1240-0000", "en", "WORDS OF UTTERANCE 0"),
        ("train-clean-100", "103-1240-0001", "en", "WORDS OF UTTERANCE 1")]
    assert pathlib.Path(items[1].path) == root / "train-clean-100/103/1240/103-1240-0000.flac"
    items, _ = discover(root / "train-clean-100", split="train")
    assert [(it.split, it.id) for it in items] == [("train", "103-1240-0000"), ("train", "103-1240-0001")]


def test_corpus_layout_reads_the_embedded_corpus() -> None:
    assert detect_layout(corpus_dir()) == "corpus" and detect_layout(manifest_path()) == "corpus"
    items, _ = discover(corpus_dir())
    assert len(items) == 220
    langs = {"cmn", "de", "en", "es", "fr", "it", "nl", "pl", "pt", "ru", "sv"}
    assert {it.language for it in items} == langs
    for lang in langs:
        assert sum(it.language == lang and it.split == "train" for it in items) == 16
        assert sum(it.language == lang and it.split == "dev" for it in items) == 4
    assert all(pathlib.Path(it.path).is_file() and it.text for it in items)
    en0 = _by_id(items)["en_0000"]
    assert (en0.split, en0.text) == ("train", "the train to the city leaves at seven")


def test_detection_errors(tmp_path: pathlib.Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no input layout matches .*force one with --layout"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a Common Voice directory"):
        discover(tmp_path / "empty", layout="commonvoice")
    with pytest.raises(ValueError, match="unknown layout"):
        discover(tmp_path / "empty", layout="kaldi")
    # The same id from two inputs would make two records indistinguishable.
    write_audio(tmp_path / "a" / "x.wav")
    write_audio(tmp_path / "b" / "x.wav")
    with pytest.raises(ValueError, match="share the id 'x'"):
        discover([tmp_path / "a", tmp_path / "b"])
    write_audio(tmp_path / "b" / "y.wav")
    items, layouts = discover([tmp_path / "a", tmp_path / "b" / "y.wav"])
    assert layouts == ["folder", "folder"] and [it.id for it in items] == ["x", "y"]
