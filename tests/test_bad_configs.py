"""Bad `xlsr-jax train` configurations: each is one line naming the key, exit code 2, before anything
compiles or is written (no checkpoint, no compiled program)."""

import json

import jax.monitoring
import pytest

from xlsr_jax.cli import main

SMOKE = "experiments/pretrain_xlsr.py:smoke"

# (overrides, what the one line must say)
CASES = [
    (["--config.optim.peak_lrr=1e-3"], "unknown config key 'optim.peak_lrr'; did you mean 'optim.peak_lr'?"),
    (["--config.optm.peak_lr=1e-3"], "did you mean 'optim'?"),
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


@pytest.fixture
def compiles():
    """The programs XLA compiles or loads from the compilation cache while the test runs."""
    seen = []
    on_event = lambda event, **_: seen.append(event) if event.startswith("/jax/compilation_cache/") else None
    on_duration = lambda event, _secs, **__: seen.append(event) if event.startswith("/jax/core/compile/backend") else None
    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    yield seen
    jax.monitoring.unregister_event_listener(on_event)
    jax.monitoring.unregister_event_duration_listener(on_duration)


@pytest.mark.parametrize("overrides,message", CASES, ids=[c[0][0].split("=")[0].removeprefix("--config.") for c in CASES])
def test_a_bad_config_is_one_line_before_anything_runs(overrides, message, data_dir, tmp_path, capsys, compiles):
    workdir = tmp_path / "run"
    code = main(["train", "--config", SMOKE, "--workdir", str(workdir), f"--config.data.dir={data_dir}",
                 "--config.train.steps=2", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith("xlsr-jax train: error:") and message in err[-1], err[-1:]
    assert "Traceback" not in "\n".join(err)
    assert not (workdir / "checkpoints").exists() and not compiles, compiles


def test_verbose_adds_the_traceback_to_an_input_error(data_dir, tmp_path, capsys):
    code = main(["--verbose", "train", "--config", SMOKE, "--workdir", str(tmp_path / "run"),
                 f"--config.data.dir={data_dir}", "--config.optim.peak_lr=-1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" in err and "ConfigError" in err
    assert err.strip().splitlines()[-1].startswith("xlsr-jax train: error: ")


@pytest.mark.parametrize("bug", [ValueError("operands could not be broadcast"), KeyError("params")])
def test_an_internal_error_keeps_its_traceback_and_says_it_is_a_bug(bug, monkeypatch, tmp_path, capsys):
    """A ValueError (or anything else) from inside the library is not the user's input: exit 1 with the
    traceback, not the one-line treatment of `UserError`."""
    from xlsr_jax.models import heads

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(heads, "init_params", broken)
    code = main(["init", "--preset", "tiny", "--output", str(tmp_path / "model")])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" in err and "in broken" in err
    assert f"xlsr-jax init: internal error ({type(bug).__name__})" in err and "This is a bug in xlsr-jax" in err
    assert not (tmp_path / "model").exists()


def test_running_out_of_device_memory_is_one_line_with_what_to_change(monkeypatch, tmp_path, capsys):
    import jax

    from xlsr_jax.models import heads

    def too_big(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.2GiB.\nmore")

    monkeypatch.setattr(heads, "init_params", too_big)
    code = main(["init", "--preset", "tiny", "--output", str(tmp_path / "model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "ran out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.2GiB.)" in err[0]
    assert "remat_policy=full" in err[0] and "xlsr-jax fit" in err[0]


def test_fine_tuning_from_a_model_of_another_size_is_one_line(data_dir, tmp_path, capsys):
    assert main(["init", "--preset", "tiny", "--head", "base", "--output", str(tmp_path / "pretrained")]) == 0
    capsys.readouterr()
    workdir = tmp_path / "run"
    code = main(["train", "--config", "experiments/finetune_ctc.py:smoke", "--workdir", str(workdir),
                 f"--config.data.dir={data_dir}", f"--config.model.init_from={tmp_path / 'pretrained'}",
                 "--config.model.overrides.hidden_size=64", "--config.train.steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("xlsr-jax train: error:"), err[-3:]
    assert "model.overrides change the architecture" in err[-1] and "hidden_size" in err[-1]
    assert not (workdir / "checkpoints").exists()


def test_resuming_with_a_vocabulary_that_does_not_match_the_head_is_one_line(data_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    ctc = ["train", "--config", "experiments/finetune_ctc.py:smoke", "--workdir", str(workdir),
           f"--config.data.dir={data_dir}", "--config.train.eval_every=0", "--config.train.checkpoint_every=1"]
    assert main([*ctc, "--config.train.steps=1"]) == 0
    vocab = json.loads((workdir / "vocab.json").read_text())
    (tmp_path / "small.json").write_text(json.dumps({token: i for i, token in enumerate(list(vocab)[:20])}))
    capsys.readouterr()
    code = main([*ctc, "--config.train.steps=2", f"--config.data.vocab={tmp_path / 'small.json'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("xlsr-jax train: error:"), err[-3:]
    assert f"['params']['lm_head']['kernel'] saved (32, {len(vocab)}), the model has (32, 20)" in err[-1]
    assert "data.vocab" in err[-1] and "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
