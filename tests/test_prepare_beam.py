"""`prepare --runner direct` (Apache Beam's DirectRunner) writes the local path's data set byte for byte:
real recorded clips with broken files among them, a Common Voice layout and fairseq manifests; a worker
dying in the middle of a shard leaves no partial shard, and the rerun completes it."""

import filecmp
import os
import pathlib
import shutil

import numpy as np
import pytest

pytest.importorskip("apache_beam")

from data_pipelines.corpus import corpus_dir  # noqa: E402
from data_pipelines.ingest.beam import run_job  # noqa: E402
from data_pipelines.ingest.prepare import plan_job, prepare  # noqa: E402
from data_pipelines.pipeline import PipelineConfig, prepared_dataset  # noqa: E402
from data_pipelines.records import DatasetIndex  # noqa: E402
from ingest_helpers import write_audio  # noqa: E402
from xlsr_jax.cli import main  # noqa: E402


def _same_directory(a: pathlib.Path, b: pathlib.Path) -> list[str]:
    """The files of `a`, each checked equal byte for byte to `b`'s (and no file only in one of them)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    return names


@pytest.fixture(scope="module")
def clips_with_broken_files(tmp_path_factory):
    """Recorded (espeak-ng) clips of 11 languages, a folder each, and five broken files."""
    root = tmp_path_factory.mktemp("clips")
    for path in sorted(corpus_dir().glob("*/train/*.flac"))[::4]:
        shutil.copy(path, root / path.name)
    good = sorted(root.glob("*.flac"))
    odd_name = os.fsdecode(bytes(root) + b"/caf\xe9.flac")  # a name that is not UTF-8 (latin-1 bytes)
    shutil.copy(good[2], odd_name)
    good.append(pathlib.Path(odd_name))
    (root / "empty.wav").write_bytes(b"")
    (root / "cut.flac").write_bytes(good[0].read_bytes()[:300])
    (root / "text.mp3").write_text("not audio at all\n")
    (root / "short.flac").write_bytes(write_audio(root / "tmp.flac", seconds=0.1).read_bytes())
    (root / "tmp.flac").unlink()
    (root / "bad_text.flac").write_bytes(good[1].read_bytes())
    (root / "bad_text.txt").write_bytes(b"caf\xe9")
    return root, len(good)


def test_direct_runner_writes_the_local_data_set_and_the_same_first_batches(clips_with_broken_files, tmp_path):
    root, num_good = clips_with_broken_files
    local = prepare(root, tmp_path / "local", workers=0, progress=False, num_shards=3, split="train")
    job = plan_job(root, tmp_path / "beam", num_shards=3, split="train")
    index, counters = run_job(job, "direct", ["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    names = _same_directory(tmp_path / "local", tmp_path / "beam")
    assert "report.tsv" in names and "dataset.json" in names and len([n for n in names if "array_record" in n]) == 3
    assert index == local and index.splits["train"].total_records == num_good
    assert local.skipped == {"bad_text": 1, "empty": 1, "too_short": 1, "unreadable": 2}
    assert counters.files_read == num_good + 5 and counters.bad_inputs == 5
    assert counters.records_written == num_good and counters.shards_written == 3
    hours = sum(local.splits["train"].seconds_by_language.values()) / 3600
    assert counters.audio_hours == pytest.approx(hours, abs=1e-4)

    class Raw:
        crop = True

        def check(self, min_sample_size):
            pass

        def __call__(self, raw, rng):
            return raw

    config = PipelineConfig(batch_size=4, min_sample_size=8000, max_sample_size=48000, seed=3)
    batches = [prepared_dataset(d, "train", config, Raw(), shard_index=0, shard_count=1)
               for d in (tmp_path / "local", tmp_path / "beam")]
    for _ in range(3):
        a, b = next(iter(batches[0])), next(iter(batches[1]))
        assert a["texts"] == b["texts"]
        np.testing.assert_array_equal(a["input_values"], b["input_values"])


def test_common_voice_and_fairseq_layouts_through_the_cli(tmp_path, capsys):
    cv = tmp_path / "cv"
    for k in range(6):
        write_audio(cv / "clips" / f"c{k}.mp3", seconds=1.0 + k / 10, seed=k)
    (cv / "train.tsv").write_text("path\tsentence\tlocale\n" + "".join(f"c{k}.mp3\tsentence {k}\tfr\n" for k in range(4)))
    (cv / "dev.tsv").write_text("path\tsentence\tlocale\nc4.mp3\tdev one\tfr\nc5.mp3\tdev two\tfr\nc0.mp3\tleak\tfr\n")
    audio = tmp_path / "audio"
    for k in range(5):
        write_audio(audio / f"a{k}.wav", seconds=1.0, seed=10 + k)
    man = tmp_path / "manifest"
    man.mkdir()
    (man / "train.tsv").write_text(f"{audio}\n" + "".join(f"a{k}.wav\t16000\n" for k in range(4)))
    (man / "train.wrd").write_text("".join(f"words {k}\n" for k in range(4)))
    (man / "valid.tsv").write_text(f"{audio}\na4.wav\t16000\n")
    (man / "valid.wrd").write_text("valid words\n")
    for name, inputs in (("cv", cv), ("fairseq", man)):
        assert main(["prepare", str(inputs), str(tmp_path / f"{name}_local"), "--workers", "0", "--quiet",
                     "--num-shards", "2"]) == 0
        assert main(["prepare", str(inputs), str(tmp_path / f"{name}_beam"), "--runner", "direct",
                     "--num-shards", "2"]) == 0
        out = capsys.readouterr().out
        assert "beam counters:" in out and "records in" in out
        _same_directory(tmp_path / f"{name}_local", tmp_path / f"{name}_beam")
    assert DatasetIndex.load(tmp_path / "cv_beam").skipped == {"duplicate": 1}
    assert {s: v.total_records for s, v in DatasetIndex.load(tmp_path / "fairseq_beam").splits.items()} == {
        "train": 4, "valid": 1}


def test_a_worker_dying_mid_shard_leaves_no_partial_shard_and_the_rerun_completes(clips_with_broken_files,
                                                                                  tmp_path):
    root, _ = clips_with_broken_files
    prepare(root, tmp_path / "local", workers=0, progress=False, num_shards=2, split="train")
    job = plan_job(root, tmp_path / "beam", num_shards=2, split="train")
    with pytest.raises(Exception, match="injected worker failure"):
        run_job(job, "direct", fail_after=3)  # the DirectRunner does not retry a failed bundle: the run fails
    left = sorted(p.name for p in (tmp_path / "beam").iterdir())
    assert not [n for n in left if n.endswith(".array_record") or ".tmp" in n], left  # no partial shard
    assert "dataset.json" not in left
    index, counters = run_job(job, "direct")  # what a runner's retry does: the shard again, from the start
    assert counters.shards_written == 2
    _same_directory(tmp_path / "local", tmp_path / "beam")
    # A finished directory is finished for either path: nothing left to run.
    assert run_job(job, "direct")[1] is None
    assert prepare(root, tmp_path / "beam", workers=0, progress=False, num_shards=2, split="train") == index


def test_bad_runner_flags_are_one_line(tmp_path, capsys):
    assert main(["prepare", str(tmp_path), str(tmp_path / "o"), "--beam-option=--direct_num_workers=2"]) == 2
    assert "--beam-option needs --runner" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path), str(tmp_path / "o"), "--runner", "direct", "--workers", "2"]) == 2
    assert "direct_num_workers" in capsys.readouterr().err
    write_audio(tmp_path / "in" / "a.wav", seconds=1.0)
    assert main(["prepare", str(tmp_path / "in"), str(tmp_path / "o"), "--runner", "dataflow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Dataflow workers cannot see this machine's files" in err[0], err


def test_bucket_inputs_and_output_against_a_storage_emulator(emulator, tmp_path, monkeypatch):
    """gs:// in, gs:// out (a local Cloud Storage emulator): the launcher lists the bucket through
    etils.epath, the workers fetch and write through Beam's file systems; the data set equals the local
    path's over a local copy of the same files."""
    import json

    from apache_beam.io.filesystems import FileSystems

    from data_pipelines.errors import UserError
    from data_pipelines.ingest.beam import RESULTS_DIR, prepare_beam

    _, env = emulator
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    audio = tmp_path / "audio"
    for path in sorted(corpus_dir().glob("*/train/*.flac"))[::10]:
        (audio / path.parent.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, audio / path.parent.parent.name / path.name)
    (audio / "en" / "broken.wav").write_text("not audio\n")
    for path in sorted(p for p in audio.rglob("*") if p.is_file()):
        with open(path, "rb") as src, FileSystems.create(f"gs://bucket/audio/{path.relative_to(audio)}") as dst:
            dst.write(src.read())

    settings = dict(num_shards=2, split="train", language_from_parent=True)
    local = prepare(audio, tmp_path / "local", workers=0, progress=False, **settings)
    index, counters = prepare_beam("gs://bucket/audio", "gs://bucket/prepared", runner="direct", **settings)
    assert counters.records_written == local.splits["train"].total_records > 10 and counters.bad_inputs == 1

    objects = [m.path for r in FileSystems.match(["gs://bucket/prepared/**"]) for m in r.metadata_list]
    names = sorted(o.removeprefix("gs://bucket/prepared/") for o in objects)
    assert names == sorted(p.name for p in (tmp_path / "local").iterdir())  # no beam_results/ left behind
    assert not any(RESULTS_DIR in n for n in names)
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    for name in names:
        with FileSystems.open(f"gs://bucket/prepared/{name}") as f:
            (fetched / name).write_bytes(f.read())
    for name in names:
        if name.endswith((".array_record", ".npy")):
            assert filecmp.cmp(fetched / name, tmp_path / "local" / name, shallow=False), name
    assert (fetched / "report.tsv").read_text() == (tmp_path / "local" / "report.tsv").read_text().replace(
        str(audio), "gs://bucket/audio")
    ours, theirs = (json.loads((d / "dataset.json").read_text()) for d in (fetched, tmp_path / "local"))
    assert ours["source"]["inputs"] == ["gs://bucket/audio"]
    ours["source"]["inputs"] = theirs["source"]["inputs"]
    assert ours == theirs and DatasetIndex.load(fetched) == index

    with pytest.raises(UserError, match="already holds a prepared data set"):
        prepare_beam("gs://bucket/audio", "gs://bucket/prepared", runner="direct", **settings)
    with pytest.raises(UserError, match="for gs:// use --runner"):
        prepare("gs://bucket/audio", tmp_path / "x", workers=0, progress=False)
