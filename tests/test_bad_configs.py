"""Bad `xlsr-jax train` configurations: each is one line naming the key, exit code 2, before anything
compiles or is written (no checkpoint, no compiled program)."""

import pytest

from data_pipelines.corpus import corpus_dir
from data_pipelines.ingest.prepare import prepare
from xlsr_jax.cli import main

SMOKE = "experiments/pretrain_xlsr.py:smoke"

# (overrides, what the one line must say)
CASES = [
    (["--config.optim.peak_lrr=1e-3"], "unknown config key 'optim.peak_lrr'"),
    (["--config.train.steps=abc"], "train.steps"),
    (["--config.mesh_preset=", "--config.mesh.ici.data=1", "--config.mesh.ici.fsdp=16"], "16 devices"),
    (["--config.mesh_preset=v5e-9"], "v5e-9"),
    (["--config.data.max_sample_size=300"], "max_sample_size"),
    (["--config.model.preset=xlsr_300"], "unknown model preset 'xlsr_300'"),
    (["--config.data.dir=/nonexistent"], "/nonexistent"),
    (["--config.data.eval_split=nope"], "data.eval_split='nope'"),
    (["--config.data.train_split=trian"], "data.train_split='trian'"),
    (["--config.optim.peak_lr=-1"], "optim.peak_lr must be > 0"),
    (["--config.optim.b2=1.5"], "optim.b2"),
    (["--config.optim.schedule=linear"], "optim.schedule"),
    (["--config.train.accum_steps=0"], "train.accum_steps"),
    (["--config.train.accum_steps=3"], "micro-batches"),
    (["--config.data.language_sampling=hour"], "language_sampling"),
    (["--config.model.overrides.remat_policy=dot"], "remat_policy"),
    (["--config.model.overrides.hidden_size=30"], "hidden_size"),
    (["--config.data.max_tokens=1000"], "data.max_tokens=1000"),
    (["--config.objective.perplexity_groups=3"], "perplexity_groups"),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "prepared"
    prepare(corpus_dir(), out, workers=0, progress=False)
    return out


@pytest.mark.parametrize("overrides,message", CASES, ids=[c[0][0].split("=")[0].removeprefix("--config.") for c in CASES])
def test_a_bad_config_is_one_line_before_anything_runs(overrides, message, data_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = main(["train", "--config", SMOKE, "--workdir", str(workdir), f"--config.data.dir={data_dir}",
                 "--config.train.steps=2", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("xlsr-jax train: error:") and message in err[-1], err[-1:]
    assert "Traceback" not in "\n".join(err)
    assert not (workdir / "checkpoints").exists() and not list(workdir.glob("compile_cache/*"))
