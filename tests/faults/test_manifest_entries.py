"""Manifests that list a file twice or point outside their audio root: each such entry is skipped with
its reason in report.tsv (the first listing of a file is kept), never a duplicated or stray record."""

import csv

from data_pipelines.ingest.prepare import prepare
from data_pipelines.records import DatasetIndex
from ingest_helpers import write_audio


def _report(out):
    with open(out / "report.tsv", newline="") as f:
        return [(row["path"], row["reason"]) for row in csv.DictReader(f, delimiter="\t")]


def test_fairseq_manifests_with_duplicates_and_paths_out_of_the_root(tmp_path):
    audio = tmp_path / "audio"
    for name in ("a.wav", "b.wav", "c.wav"):
        write_audio(audio / name, seconds=1.0)
    secret = write_audio(tmp_path / "elsewhere" / "secret.wav", seconds=1.0)
    man = tmp_path / "manifest"
    man.mkdir()
    # b.wav twice in train, a.wav again in valid (a leak from train into dev), two ways out of the root.
    (man / "train.tsv").write_text(f"{audio}\na.wav\t1\nb.wav\t1\n./b.wav\t1\n../elsewhere/secret.wav\t1\n"
                                   f"{secret}\t1\n")
    (man / "valid.tsv").write_text(f"{audio}\nc.wav\t1\nsub/../a.wav\t1\n")
    out = tmp_path / "out"
    index = prepare(man, out, workers=0, progress=False, min_seconds=0.5)
    assert {s: index.splits[s].total_records for s in index.splits} == {"train": 2, "valid": 1}
    assert index.skipped == {"duplicate": 2, "outside_root": 2}
    report = _report(out)
    assert sorted(reason for _, reason in report) == ["duplicate", "duplicate", "outside_root", "outside_root"]
    assert {p for p, r in report if r == "outside_root"} == {str(audio / "../elsewhere/secret.wav"), str(secret)}


def test_corpus_and_common_voice_entries(tmp_path):
    root = tmp_path / "corpus"
    for name in ("x.wav", "y.wav"):
        write_audio(root / name, seconds=1.0)
    write_audio(tmp_path / "outside.wav", seconds=1.0)
    (root / "manifest.tsv").write_text("path\tsplit\tlanguage\ttext\nx.wav\ttrain\ten\thi\ny.wav\ttrain\ten\tyo\n"
                                       "x.wav\tdev\ten\thi\n../outside.wav\ttrain\ten\tno\n")
    index = prepare(root, tmp_path / "out", workers=0, progress=False, min_seconds=0.5)
    assert index.splits["train"].total_records == 2 and index.skipped == {"duplicate": 1, "outside_root": 1}

    cv = tmp_path / "cv"
    write_audio(cv / "clips" / "one.mp3", seconds=1.0)
    write_audio(cv / "two.mp3", seconds=1.0)
    (cv / "train.tsv").write_text("path\tsentence\none.mp3\thello\n../two.mp3\tthere\n")
    (cv / "dev.tsv").write_text("path\tsentence\none.mp3\thello\n")
    index = prepare(cv, tmp_path / "out_cv", workers=0, progress=False, min_seconds=0.5)
    assert {s: index.splits[s].total_records for s in index.splits} == {"train": 1, "dev": 0}  # dev was a leak
    assert index.skipped == {"duplicate": 1, "outside_root": 1}
    assert DatasetIndex.load(tmp_path / "out_cv").skipped == index.skipped
