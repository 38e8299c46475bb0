"""`xlsr-jax demo --minutes 1`: the README's first command, end to end in a fresh process.

Asserted: every stage ran on the real paths and left what the report says it left; the fine-tuning
losses fell, CTC's dev CER is below the all-blank output's 1.0 and language ID is above chance.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from data_pipelines.records import DatasetIndex
from xlsr_jax.demo import Demo, Plan, Stage
from xlsr_jax.model_dir import read_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "import sys; from xlsr_jax.cli import main; sys.exit(main())"]


def test_budget_scales_the_steps():
    small, default, big = Plan.for_minutes(1), Plan.for_minutes(10), Plan.for_minutes(30)
    assert small.pretrain_steps < default.pretrain_steps < big.pretrain_steps
    assert small.ctc_steps < default.ctc_steps < big.ctc_steps and small.lid_steps >= 10
    with pytest.raises(ValueError, match="--minutes must be positive"):
        Plan.for_minutes(0)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the demo picks its own device count
    run = subprocess.run(CLI + ["demo", "--workdir", str(workdir), "--minutes", "1"], cwd=ROOT,
                         env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    return workdir, run.stdout


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(demo_run):
    workdir, out = demo_run
    summary = json.loads((workdir / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["prepare", "pretrain", "fit", "finetune_ctc", "finetune_lid", "export_hf"]
    assert all(s["seconds"] > 0 for s in stages.values())
    for name in stages:
        assert f"== {name} (" in out

    index = DatasetIndex.load(workdir / "data")
    languages = list(index.languages)
    assert stages["prepare"]["summary"]["records"] == {"train": 176, "dev": 44} and len(languages) == 11

    # Pretraining on a 2-device mesh, stopped by SIGTERM half way and resumed from that step.
    pre = stages["pretrain"]["summary"]
    plan = summary["plan"]
    assert pre["steps"] == plan["pretrain_steps"] and pre["devices"] == 2
    assert 1 <= pre["preempted_at"] < plan["pretrain_steps"]
    assert f"resumed from step {pre['preempted_at']}" in out
    logged = [json.loads(line) for line in (workdir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in logged if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == plan["pretrain_steps"]
    assert read_config(workdir / "models" / "pretrained")[1] == "pretraining"

    # The TPU compile (the tpu extra is part of the CI install).
    fit = stages["fit"]["summary"]
    assert fit["target"].startswith("v5e-8") and fit["fits"] and fit["peak_gib"] > 0

    ctc = stages["finetune_ctc"]["summary"]
    assert ctc["steps"] == plan["ctc_steps"] and ctc["loss"][1] < ctc["loss"][0]
    # Below the all-blank output's CER of 1.0 (0.914 and blank ratio 0.943 measured here).
    assert 0 < ctc["metrics"]["cer"] < 0.97 and ctc["metrics"]["blank_ratio"] < 0.99, ctc["metrics"]
    assert set(ctc["per_language"]) == set(languages)
    lid = stages["finetune_lid"]["summary"]
    assert lid["confusion_labels"] == languages
    assert sum(map(sum, lid["confusion"])) == 44
    # The head on the (barely pretrained) frozen encoder: 8 of 44 dev clips measured, chance is 4.
    assert lid["metrics"]["accuracy"] >= 1.5 / len(languages), lid["metrics"]
    assert lid["loss"][1] < lid["loss"][0]
    assert read_config(workdir / "models" / "lid")[0].id2label == tuple(languages)

    hf = stages["export_hf"]["summary"]
    assert hf["agree"] and hf["ctc_max_abs_diff"] < 1e-4 and hf["lid_max_abs_diff"] < 1e-4
    for name in ("ctc", "lid"):
        assert (workdir / "hf" / name / "config.json").is_file()

    report = (workdir / "report.html").read_text()
    assert f"report: {workdir / 'report.html'}" in out
    assert report.count("<svg") >= 6 and "polyline" in report and "confusion" in report
    for artifact in (workdir / "data", workdir / "models" / "ctc", workdir / "hf" / "lid"):
        assert str(artifact) in report


@pytest.mark.slow
def test_a_stage_without_its_extra_says_how_to_enable_it(demo_run, monkeypatch):
    workdir, _ = demo_run
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "torch" else real(name))
    stage = Stage("export_hf")
    Demo(workdir, minutes=1).export_hf(stage)
    assert 'pip install -e ".[torch]"' in stage.skipped and not stage.summary
    assert (workdir / "hf" / "ctc" / "config.json").is_file()  # the export itself needs no torch
