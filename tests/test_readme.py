"""The README's runnable blocks (a fenced bash block after `<!-- runnable -->`), run as written on tiny inputs.

Each command gets only the substitutions in SUBSTITUTIONS (placeholders -> the embedded corpus, `smoke`
configs, a v5e-8 slice, a local directory for the bucket, a random tiny Hugging Face model for the Hub
id) and, for `xlsr-jax train`, FEW_STEPS. `xlsr-jax` commands run in this process through the CLI's
`main` (as the console script does); other lines run in bash. Every command must succeed.
"""

import pathlib
import re
import shlex
import shutil
import subprocess
import time

import pytest

from data_pipelines.corpus import corpus_dir, sample_paths
from xlsr_jax.cli import main
from xlsr_jax.config import get_preset

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FEW_STEPS = ["--config.train.steps=4", "--config.optim.total_steps=4", "--config.train.checkpoint_every=4",
             "--config.train.eval_every=0", "--config.train.log_every=2",
             "--config.data.num_buckets=1"]  # one compiled step per run


def substitutions(tmp: pathlib.Path) -> list[tuple[str, str]]:
    return [
        ("experiments/", f"{ROOT}/experiments/"),
        (".py:xlsr_300m", ".py:smoke"),
        ("v5p-128", "v5e-8"),
        ("--config.train.accum_steps=2", "--config.train.accum_steps=1"),  # the smoke batch on 8 devices
        ("gs://my-bucket/", f"{tmp}/bucket/"),
        ("gcloud storage cat", "cat"),
        ("/data/my-audio", str(corpus_dir())),
        ("/data/cv-corpus-17.0/fr", str(corpus_dir())),
        ("/data/", f"{tmp}/data/"),
        ("facebook/wav2vec2-xls-r-300m", f"{tmp}/hub/wav2vec2-xls-r-300m"),
        ("--layer 12", "--layer 2"),  # the tiny model has 2 layers
    ]  # fmt: skip


def runnable_blocks(text: str) -> list[list[str]]:
    """Commands of each runnable block: comments dropped, backslash continuations joined."""
    blocks = []
    for body in re.findall(r"<!-- runnable -->\s*```bash\n(.*?)```", text, flags=re.S):
        joined = body.replace("\\\n", " ")
        blocks.append([line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")])
    return blocks


def test_the_journeys_have_runnable_blocks():
    blocks = runnable_blocks(README.read_text())
    assert len(blocks) == 3
    commands = [c.split()[1] for block in blocks for c in block if c.startswith("xlsr-jax ")]
    for name in ("prepare", "fit", "launch", "train", "export", "convert", "evaluate", "transcribe", "embed"):
        assert name in commands, name


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch, capsys, users_matmul_precision):
    transformers = pytest.importorskip("transformers")
    from hf_helpers import random_hf_model

    random_hf_model(get_preset("tiny"), "pretraining").save_pretrained(tmp_path / "hub" / "wav2vec2-xls-r-300m")
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(tmp_path / "hub" / "wav2vec2-xls-r-300m")
    shutil.copy(sample_paths()[0], tmp_path / "interview.flac")
    monkeypatch.chdir(tmp_path)
    subs = substitutions(tmp_path)
    timings = []
    for block in runnable_blocks(README.read_text()):
        for command in block:
            for old, new in subs:
                command = command.replace(old, new)
            start = time.perf_counter()
            if command.startswith("xlsr-jax "):
                argv = shlex.split(command)[1:]
                if argv[0] == "train":
                    argv += FEW_STEPS
                code = main(argv)
                captured = capsys.readouterr()
                assert code == 0, f"{command}\n{captured.err[-3000:]}"
            else:
                run = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
                assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"
                assert run.stdout.strip(), command
            timings.append((time.perf_counter() - start, command[:100]))
    print("\n".join(f"{t:6.1f} s  {c}" for t, c in timings))
    # What the journeys leave behind.
    assert (tmp_path / "bucket" / "xlsr-300m" / "checkpoints").is_dir()
    assert (tmp_path / "xlsr-300m-mine-hf" / "config.json").is_file()
    assert (tmp_path / "asr-fr-hf" / "vocab.json").is_file()
    assert (tmp_path / "features" / "interview.npy").is_file()
