"""A model directory that was tampered with or half copied: one clear error naming what is wrong."""

import json
import shutil

import pytest

from xlsr_jax.cli import main
from xlsr_jax.config import get_preset
from xlsr_jax.model_dir import ModelDirError, load_model_dir, save_model_dir
from xlsr_jax.models.heads import init_params


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = get_preset("tiny")
    return save_model_dir(tmp_path_factory.mktemp("m") / "model", config, init_params(config, "ctc"), "ctc")


def _tamper(src, dst, how):
    shutil.copytree(src, dst)
    cfg = dst / "config.json"
    if how == "config not JSON":
        cfg.write_bytes(b'{"head": "ctc", \xff')
    elif how == "config a list":
        cfg.write_text("[1, 2]")
    elif how == "wrong type":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "hidden_size": "wide"}))
    elif how == "other size":
        data = json.loads(cfg.read_text())
        cfg.write_text(json.dumps({**data, "hidden_size": 64, "intermediate_size": 128}))
    elif how == "params missing":
        shutil.rmtree(dst / "params")
    elif how == "no head":
        cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items() if k != "head"}))
    return dst


CASES = {
    "config not JSON": "config.json is corrupt",
    "config a list": "config.json is not a JSON object",
    "wrong type": "config.json does not describe a valid model",
    "other size": "params does not match the model in config.json",
    "params missing": "has no params/ checkpoint",
    "no head": "has no valid 'head'",
}


@pytest.mark.parametrize("how", list(CASES))
def test_a_tampered_model_directory_is_a_clear_error(how, model_dir, tmp_path):
    broken = _tamper(model_dir, tmp_path / "model", how)
    with pytest.raises(ModelDirError, match=CASES[how]):
        load_model_dir(broken)


@pytest.mark.parametrize("how", ["config not JSON", "other size"])
def test_the_cli_says_it_in_one_line(how, model_dir, tmp_path, capsys):
    broken = _tamper(model_dir, tmp_path / "model", how)
    code = main(["convert", "jax-to-hf", "--input", str(broken), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and CASES[how] in err[0], err
    assert not (tmp_path / "hf").exists()
