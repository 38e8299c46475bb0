"""`xlsr-jax demo`: the whole system on the embedded corpus, in minutes on a CPU machine.

prepare -> pretrain (interrupted by SIGTERM, resumed) -> what the config needs on a TPU slice ->
fine-tune CTC and language ID from the exported encoder -> evaluate -> export to Hugging Face
(and, with torch installed, check that transformers computes what we compute) -> `report.html`.

Every stage calls the same library functions as the commands a user types (`prepare`, `train`,
`fit`, `export`, `evaluate`, `convert jax-to-hf`) and writes into one work directory; the
report says where each artifact is. Stages whose extra is not installed are skipped, with the
install command that enables them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import threading
import time
from collections.abc import Callable

import numpy as np

from xlsr_jax.config import ConfigError

log = logging.getLogger(__name__)

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
DEFAULT_MINUTES = 10.0
TPU_TARGET = "v5e-8"  # the slice `fit` compiles the demo's config for
PARITY_CLIPS = 8  # dev clips run through transformers for the logit comparison
FIXED_SECONDS = 180.0  # compiles, evaluation, export and conversion (measured, 2 CPU cores: BENCHMARKS.md)
# Seconds per training step of each stage on 2 CPU cores (measured: BENCHMARKS.md). The training
# budget is split between the stages by BUDGET_SHARE and turned into steps with these.
STEP_SECONDS = {"pretrain": 0.3, "ctc": 0.08, "lid": 0.2}
BUDGET_SHARE = {"pretrain": 0.5, "ctc": 0.3, "lid": 0.2}
MIN_STEPS = {"pretrain": 8, "ctc": 600, "lid": 150}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Training steps per stage for a time budget."""

    minutes: float
    pretrain_steps: int
    ctc_steps: int
    lid_steps: int

    @classmethod
    def for_minutes(cls, minutes: float) -> "Plan":
        if not minutes > 0:
            raise ConfigError(f"--minutes must be positive, got {minutes}")
        training = max(minutes * 60.0 - FIXED_SECONDS, 0.0)
        steps = {name: max(MIN_STEPS[name], int(training * BUDGET_SHARE[name] / STEP_SECONDS[name]))
                 for name in STEP_SECONDS}
        return cls(minutes, steps["pretrain"], steps["ctc"], steps["lid"])


@dataclasses.dataclass
class Stage:
    """One stage's outcome: wall time, the numbers it produced, its artifacts, or why it was skipped."""

    name: str
    seconds: float = 0.0
    summary: dict = dataclasses.field(default_factory=dict)
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)
    skipped: str = ""  # why, and how to enable it


@dataclasses.dataclass
class DemoResult:
    workdir: pathlib.Path
    plan: Plan
    stages: list[Stage]
    curves: dict[str, list[dict]]  # stage name -> logged train metrics (and "<name>/eval" rows)
    report: pathlib.Path | None = None

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def to_json(self) -> dict:
        return {"workdir": str(self.workdir), "plan": dataclasses.asdict(self.plan),
                "stages": [dataclasses.asdict(s) for s in self.stages], "seconds": self.seconds,
                "report": str(self.report) if self.report else None}


def experiment(name: str, overrides: list[str]):
    """`experiments/<name>` of this source tree, with overrides (the demo runs from a checkout)."""
    from xlsr_jax.experiment import load_experiment

    file, _, preset = name.partition(":")
    if not (EXPERIMENTS / file).is_file():
        raise ConfigError(f"{EXPERIMENTS / file} not found: the demo runs from a source checkout "
                          "(python3 -m pip install -e . in the repository)")
    return load_experiment(f"{EXPERIMENTS / file}:{preset}", overrides)


def frozen_encoder_head(steps: int, task: str) -> list[str]:
    """Overrides that train a fine-tuning head ("ctc" or "lid") on the frozen encoder for `steps`.

    The small encoders of the demo (and of benchmarks/bench_learning.py) fine-tuned whole sit on the
    all-blank CTC plateau, and at chance for language ID, for hundreds of steps; their heads trained
    on the frozen encoder at a high learning rate, without SpecAugment, learn within minutes, and a
    step takes no encoder gradient (BENCHMARKS.md).
    """
    overrides = ["--config.optim.peak_lr=1e-2", f"--config.optim.freeze_encoder_steps={steps}",
                 "--config.model.overrides.mask_time_prob=0.0", "--config.model.overrides.mask_feature_prob=0.0"]
    if task == "ctc":
        overrides += ["--config.optim.phase_ratio=(0.05,0.75,0.2)", "--config.data.num_buckets=1"]
    return overrides


class _SigtermAt:
    """Sends this process SIGTERM once the run in `workdir` has logged `step` (a preemption, simulated)."""

    def __init__(self, workdir: pathlib.Path, step: int):
        self._metrics, self._step = workdir / "metrics.jsonl", step
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _logged(self) -> int:
        try:
            lines = self._metrics.read_text().splitlines()
        except FileNotFoundError:
            return 0
        return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)

    def _watch(self):
        while not self._done.wait(0.2):
            if self._logged() >= self._step:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def __enter__(self):
        # The loop installs its own SIGTERM handler while it trains and puts this one back after: a
        # signal sent just as the run ends is ignored instead of ending the demo.
        self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: log.info("late SIGTERM ignored"))
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        signal.signal(signal.SIGTERM, self._previous)


def _read_metrics(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _final_eval(rows: list[dict]) -> dict:
    evals = [r for r in rows if r.get("split") == "eval"]
    return evals[-1] if evals else {}


class Demo:
    """Runs the stages in order into `workdir`; `on_stage(stage)` is called as each one finishes."""

    def __init__(self, workdir: str | pathlib.Path, minutes: float = DEFAULT_MINUTES,
                 on_stage: Callable[[Stage], None] | None = None):
        self.workdir = pathlib.Path(workdir).resolve()
        self.plan = Plan.for_minutes(minutes)
        self.on_stage = on_stage or (lambda stage: None)
        self.stages: list[Stage] = []
        self.curves: dict[str, list[dict]] = {}
        self.data = self.workdir / "data"
        self.models = self.workdir / "models"

    def run(self) -> DemoResult:
        import jax

        self.workdir.mkdir(parents=True, exist_ok=True)
        # Restarts load the compiled train step instead of compiling it again.
        jax.config.update("jax_compilation_cache_dir", str(self.workdir / "jax_cache"))
        for name, fn in (("prepare", self.prepare), ("pretrain", self.pretrain), ("fit", self.fit),
                         ("finetune_ctc", self.finetune_ctc), ("finetune_lid", self.finetune_lid),
                         ("export_hf", self.export_hf)):
            stage = Stage(name)
            start = time.perf_counter()
            fn(stage)
            stage.seconds = time.perf_counter() - start
            self.stages.append(stage)
            self.on_stage(stage)
        result = DemoResult(self.workdir, self.plan, self.stages, self.curves)
        from xlsr_jax.demo_report import write_report

        result.report = write_report(result, self.workdir / "report.html")
        (self.workdir / "summary.json").write_text(json.dumps(result.to_json(), indent=2))
        return result

    # -- stages ---------------------------------------------------------------------------------

    def prepare(self, stage: Stage) -> None:
        from data_pipelines.corpus import corpus_dir
        from data_pipelines.ingest.prepare import prepare, summarize
        from data_pipelines.records import DatasetIndex

        if (self.data / "dataset.json").is_file():
            index = DatasetIndex.load(self.data)
        else:
            index = prepare(corpus_dir(), self.data, workers=0, progress=True)
        stage.summary = {"line": summarize(index), "languages": list(index.languages),
                         "records": {k: s.total_records for k, s in index.splits.items()},
                         "hours": {k: round(sum(s.seconds_by_language.values()) / 3600, 4)
                                   for k, s in index.splits.items()}}
        stage.artifacts = {"prepared data (ArrayRecord shards, dataset.json)": str(self.data)}

    def _pretrain_config(self):
        steps = self.plan.pretrain_steps
        return experiment("pretrain_xlsr.py:smoke", [
            f"--config.data.dir={self.data}", f"--config.train.steps={steps}", f"--config.optim.total_steps={steps}",
            f"--config.optim.warmup_steps={max(1, steps // 10)}", f"--config.train.log_every={max(1, steps // 40)}",
            f"--config.train.checkpoint_every={max(2, steps // 4)}", f"--config.train.eval_every={steps}",
            "--config.train.eval_batches=0", "--config.data.num_buckets=1"])

    def pretrain(self, stage: Stage) -> None:
        from xlsr_jax.train.export import export_checkpoint
        from xlsr_jax.train.loop import train_and_evaluate

        config = self._pretrain_config()
        run = self.workdir / "pretrain"
        total = self.plan.pretrain_steps
        preempted_at = None
        if not (run / "checkpoints").is_dir():
            # A fresh run is stopped by SIGTERM at about half way, as a preempted pod job is: it saves
            # the step it reached and returns. The same call again resumes from there, data position included.
            with _SigtermAt(run, max(1, total // 2)):
                first = train_and_evaluate(config, run)
            preempted_at = first.step if first.preempted else None
        start = time.perf_counter()
        second = train_and_evaluate(config, run)
        stage.summary["resumed_run_seconds"] = time.perf_counter() - start
        model = export_checkpoint(run, self.models / "pretrained", overwrite=True)
        rows = _read_metrics(run)
        self.curves["pretrain"] = rows
        train = [r for r in rows if r.get("split") == "train"]
        stage.summary.update({
            "steps": second.step, "preempted_at": preempted_at, "devices": _device_count(),
            "loss": [train[0]["loss"], train[-1]["loss"]] if train else None,
            "accuracy": train[-1].get("accuracy") if train else None,
            "code_perplexity": train[-1].get("code_perplexity") if train else None,
            "audio_seconds_per_second": train[-1].get("audio_seconds_per_second") if train else None,
            "eval": {k: v for k, v in _final_eval(rows).items() if k in ("loss", "accuracy", "code_perplexity")},
        })  # fmt: skip
        stage.artifacts = {"pretraining run (checkpoints, metrics.jsonl, tensorboard)": str(run),
                           "pretrained encoder (model directory)": str(model)}

    def fit(self, stage: Stage) -> None:
        if importlib.util.find_spec("libtpu") is None:
            stage.skipped = 'needs the tpu extra: python3 -m pip install -e ".[tpu]"'
            return
        from xlsr_jax.parallel.topology import parse_topology
        from xlsr_jax.train.fit import fit, format_report

        config = self._pretrain_config()
        config.mesh_preset = TPU_TARGET
        _, report = fit(config, topology=parse_topology(TPU_TARGET))
        stage.summary = {"lines": format_report(report), **report.summary(),
                         "command": "xlsr-jax fit --config experiments/pretrain_xlsr.py:xlsr_300m "
                                    "--topology v5p-128 --config.mesh_preset=v5p-128 --config.train.accum_steps=2 "
                                    "--search batch"}

    def _finetune(self, stage: Stage, name: str, spec: str, steps: int, extra: list[str]) -> pathlib.Path:
        from xlsr_jax.evaluate import evaluate_model_dir
        from xlsr_jax.train.export import export_checkpoint
        from xlsr_jax.train.loop import train_and_evaluate

        config = experiment(spec, [
            f"--config.model.init_from={self.models / 'pretrained'}", f"--config.data.dir={self.data}",
            f"--config.train.steps={steps}", f"--config.optim.total_steps={steps}",
            # Evaluated once, after export, by `xlsr-jax evaluate`'s function (the loop's evaluation gives the
            # same numbers, tests/test_finetune.py): one compile fewer.
            "--config.train.eval_every=0", f"--config.train.checkpoint_every={steps}",
            f"--config.train.log_every={max(1, steps // 40)}", *extra])
        run = self.workdir / name
        train_and_evaluate(config, run)
        model = export_checkpoint(run, self.models / name.removeprefix("finetune_"), overwrite=True)
        report = evaluate_model_dir(model, self.data, "dev", batch_size=8, num_buckets=1, progress=False)
        report.write(self.workdir / f"eval_{name.removeprefix('finetune_')}.json")
        rows = _read_metrics(run)
        self.curves[name] = rows
        train = [r for r in rows if r.get("split") == "train"]
        stage.summary = {"steps": steps, "loss": [train[0]["loss"], train[-1]["loss"]] if train else None,
                         "metrics": report.metrics, "per_language": report.per_language,
                         "examples": report.examples[:5], "confusion_labels": report.confusion_labels,
                         "confusion": report.confusion}
        stage.artifacts = {f"{name} run": str(run), f"{name} model directory": str(model),
                           f"{name} evaluation (JSON)": str(self.workdir / f"eval_{name.removeprefix('finetune_')}.json")}
        return model

    def finetune_ctc(self, stage: Stage) -> None:
        steps = self.plan.ctc_steps
        self._finetune(stage, "finetune_ctc", "finetune_ctc.py:smoke", steps, frozen_encoder_head(steps, "ctc"))

    def finetune_lid(self, stage: Stage) -> None:
        steps = self.plan.lid_steps
        self._finetune(stage, "finetune_lid", "finetune_lid.py:smoke", steps, frozen_encoder_head(steps, "lid"))

    def export_hf(self, stage: Stage) -> None:
        from xlsr_jax.convert.hf import jax_to_hf

        hf = self.workdir / "hf"
        outputs = {}
        for name in ("ctc", "lid"):
            if (hf / name).exists():
                shutil.rmtree(hf / name)
            outputs[name] = jax_to_hf(self.models / name, hf / name)
        stage.artifacts = {f"Hugging Face {name} directory": str(path) for name, path in outputs.items()}
        if not (importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")):
            stage.skipped = 'the PyTorch check needs the torch extra: python3 -m pip install -e ".[torch]"'
            return
        stage.summary = hf_agreement(self.models, outputs, self.data)


def _device_count() -> int:
    import jax

    return jax.device_count()


def hf_agreement(models: pathlib.Path, hf_dirs: dict[str, pathlib.Path], data_dir: pathlib.Path) -> dict:
    """Max |ours - transformers'| over dev clips: CTC logits and classification probabilities (float32)."""
    import torch
    import transformers

    from data_pipelines.records import decode_record
    from data_pipelines.sources import PreparedSource
    from xlsr_jax.inference import Predictor

    source = PreparedSource(data_dir, "dev")
    waves = [decode_record(source.records[i]).audio for i in range(min(PARITY_CLIPS, len(source)))]
    out = {"clips": len(waves), "transformers": transformers.__version__, "torch": torch.__version__}
    for name, cls, compare in (("ctc", transformers.Wav2Vec2ForCTC, lambda p, w: p.ctc_logits(w)),
                               ("lid", transformers.Wav2Vec2ForSequenceClassification,
                                lambda p, w: np.asarray(p.classify(w).probs))):
        ours = Predictor.load(models / name)
        theirs = cls.from_pretrained(hf_dirs[name]).eval()
        extractor = transformers.AutoFeatureExtractor.from_pretrained(hf_dirs[name])
        worst = 0.0
        for wave in waves:
            features = extractor(wave, sampling_rate=16000, return_tensors="pt")
            with torch.no_grad():
                logits = theirs(**features).logits.numpy()[0]
            if name == "lid":
                logits = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            diff = float(np.max(np.abs(logits - compare(ours, wave))))
            worst = diff if math.isnan(diff) or diff > worst else worst  # a NaN must not vanish in max()
        out[f"{name}_max_abs_diff"] = worst
    out["agree"] = all(out[f"{n}_max_abs_diff"] < 1e-4 for n in ("ctc", "lid"))  # False for NaN
    return out
