"""Scoring a model directory on a split of a prepared data set (`xlsr-jax evaluate`).

The model's params are placed on a mesh of this machine's devices (batch rows split over a `data`
axis, parameters replicated), its head's evaluation task comes from `xlsr_jax.tasks`, and the split
runs through `train.evaluation.evaluate_split`: the same pipeline, predictions and evaluator as the
training loop's periodic evaluation, so a run's logged WER and this WER are one computation.
Utterances are normalized when the model's config says `do_normalize`, as in training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Mapping

import jax
import numpy as np

from data_pipelines.pipeline import PipelineConfig
from data_pipelines.records import DatasetIndex
from xlsr_jax.config import ConfigError
from xlsr_jax.model_dir import load_model_dir, read_config
from xlsr_jax.models.heads import abstract_params, build_model
from xlsr_jax.parallel.mesh import build_mesh, validate_for_model
from xlsr_jax.parallel.rules import DEFAULT_RULES, logical_sharding, param_shardings
from xlsr_jax.tasks import Evaluator, evaluation_task
from xlsr_jax.train.evaluation import evaluate_split
from xlsr_jax.train.step import jit_predict_step, make_predict_step

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_NUM_BUCKETS = 4


@dataclasses.dataclass
class EvalReport:
    """What `evaluate_model_dir` measured; `to_json()` is the file `xlsr-jax evaluate` writes."""

    model_dir: str
    data_dir: str
    split: str
    head: str
    metrics: dict[str, float]  # overall metrics, the task's best-checkpoint metric first
    per_language: dict[str, dict[str, float]]  # language -> {metric: value} (e.g. "wer/en" -> ["en"]["wer"])
    examples: list[tuple[str, str]]  # (reference, hypothesis) of a few utterances (CTC)
    confusion_labels: list[str]  # rows (true) and columns (predicted) of `confusion` (classification)
    confusion: list[list[int]] | None
    seconds: float  # wall time of the evaluation, compiles included

    def to_json(self) -> dict:
        """Everything as JSON types; a confusion matrix as {"labels": [...], "matrix": counts[true][predicted]}."""
        out = {
            "model_dir": self.model_dir, "data_dir": self.data_dir, "split": self.split, "head": self.head,
            "metrics": self.metrics, "per_language": self.per_language, "seconds": self.seconds,
        }  # fmt: skip
        if self.examples:
            out["examples"] = [{"reference": r, "hypothesis": h} for r, h in self.examples]
        if self.confusion is not None:
            out["confusion"] = {"labels": self.confusion_labels, "matrix": self.confusion}
        return out

    def write(self, path: str | pathlib.Path) -> pathlib.Path:
        """Writes `to_json()` to `path` (its folder is created); returns the path."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path


def default_output(model_dir: str | pathlib.Path, data_dir: str | pathlib.Path, split: str) -> pathlib.Path:
    """MODEL_DIR/eval_<data dir name>_<split>.json: next to the model, one file per data set and split."""
    return pathlib.Path(model_dir) / f"eval_{pathlib.Path(data_dir).absolute().name}_{split}.json"


def check_split(data_dir: str | pathlib.Path, split: str) -> DatasetIndex:
    """The data set's index; raises FileNotFoundError / ConfigError for a missing data set or split."""
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    index = DatasetIndex.load(data_dir)
    if split not in index.splits:
        raise ConfigError(f"{data_dir} has no split {split!r}; its splits are {sorted(index.splits)}")
    return index


class _Progress:
    """Passes batches on to an evaluator and advances a progress bar by their real rows."""

    def __init__(self, evaluator: Evaluator, bar):
        self.evaluator, self.bar = evaluator, bar

    def add(self, batch, outputs) -> None:
        self.evaluator.add(batch, outputs)
        self.bar.update(int(np.sum(batch["valid"])))

    def counts(self) -> dict[str, float]:
        return self.evaluator.counts()

    def result(self, counts: Mapping[str, float]) -> dict[str, float]:
        return self.evaluator.result(counts)


def evaluate_model_dir(model_dir: str | pathlib.Path, data_dir: str | pathlib.Path, split: str = "dev",
                       batch_size: int = DEFAULT_BATCH_SIZE, num_buckets: int = DEFAULT_NUM_BUCKETS,
                       max_batches: int = 0, dtype: str | None = None, lowercase: bool | None = None,
                       progress: bool = True) -> EvalReport:
    """Score a CTC or language-ID model directory on every record of `split` (or its first `max_batches`).

    `batch_size` rows per batch are split over this machine's devices (a multiple of their number);
    `num_buckets` padded lengths means as many compiled programs. `lowercase` applies to CTC
    references (None: when the vocabulary has no uppercase letter). `progress` shows a bar on stderr.
    """
    start = time.perf_counter()
    model_dir, data_dir = pathlib.Path(model_dir), pathlib.Path(data_dir)
    model_config, head = read_config(model_dir)  # every input is checked before params are read
    index = check_split(data_dir, split)
    task = evaluation_task(head, model_config, model_dir, data_dir, split, lowercase=lowercase)

    if max_batches < 0:
        raise ConfigError(f"max_batches must be >= 0 (0: the whole split), got {max_batches}")
    devices = jax.local_devices()
    if batch_size < 1 or batch_size % len(devices):
        raise ConfigError(f"batch size {batch_size} does not split over {len(devices)} device(s): "
                          f"use a positive multiple of {len(devices)}")
    pipeline = PipelineConfig(batch_size=batch_size, normalize=model_config.do_normalize, num_buckets=num_buckets)
    pipeline.validate()
    mesh = build_mesh({"ici": {"data": -1}, "dcn": {}}, devices)
    rules = DEFAULT_RULES
    validate_for_model(mesh, model_config, batch_size)
    # Stacked layers (nn.scan): the directory's own layout, and one compiled layer body.
    overrides = {"scan_layers": True, **({"dtype": dtype} if dtype else {})}
    shardings = param_shardings(abstract_params(model_config.replace(**overrides), head), mesh, rules)
    model_config, head, params = load_model_dir(model_dir, shardings=shardings, **overrides)
    model = build_model(model_config, head)
    predict_step = jit_predict_step(make_predict_step(model, task.predict, mesh, rules), mesh, rules, shardings,
                                    {k: logical_sharding(a, mesh, rules) for k, a in task.eval_axes.items()})

    from tqdm import tqdm

    evaluator = task.make_evaluator()
    total = index.splits[split].total_records
    log.info("evaluating %s (%s) on %d utterances of %s/%s over %d device(s)", model_dir, head, total, data_dir,
             split, len(devices))
    with tqdm(total=total, unit="utt", desc=f"evaluate {split}", delay=2.0, disable=not progress,
              dynamic_ncols=True) as bar:
        metrics, _, counts = evaluate_split(task, predict_step, params, data_dir, split, pipeline, mesh, rules,
                                            max_batches=max_batches, evaluator=_Progress(evaluator, bar))

    best = task.best_metric[0]
    overall = {k: v for k, v in metrics.items() if "/" not in k}
    overall = {**({best: overall[best]} if best in overall else {}), **overall}
    per_language: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if "/" in key:
            name, lang = key.split("/", 1)
            per_language.setdefault(lang, {})[name] = value
    # Optional evaluator extras: decoded examples (CTC), a confusion matrix over its labels (classification).
    examples = [tuple(e) for e in getattr(evaluator, "examples", [])]
    confusion = evaluator.confusion(counts) if hasattr(evaluator, "confusion") else None
    return EvalReport(
        model_dir=str(model_dir), data_dir=str(data_dir), split=split, head=head, metrics=overall,
        per_language=per_language, examples=examples,
        confusion_labels=list(getattr(evaluator, "labels", [])) if confusion is not None else [],
        confusion=confusion.astype(int).tolist() if confusion is not None else None,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def format_report(report: EvalReport, max_confusion_labels: int = 40) -> list[str]:
    """The report as text lines: overall metrics, one row per language, examples, the confusion matrix.

    The printed matrix keeps only labels that occur as a true or predicted label (a 128-language
    model evaluated on 10 languages prints 10-odd columns); the JSON holds all of them.
    """
    from xlsr_jax.tasks.classification import format_confusion

    lines = [f"{report.head} model {report.model_dir} on {report.data_dir} split {report.split!r} "
             f"({report.seconds:.1f} s)", ""]
    width = max(len(k) for k in report.metrics) + 2
    lines += [f"{name:<{width}}{_number(value)}" for name, value in report.metrics.items()]
    if report.per_language:
        columns = list(dict.fromkeys(k for row in report.per_language.values() for k in row))
        lang_width = max(10, *(len(x) + 2 for x in report.per_language))
        lines += ["", "language".ljust(lang_width) + "".join(c.rjust(12) for c in columns)]
        for lang, row in report.per_language.items():
            lines.append(lang.ljust(lang_width) + "".join(_number(row[c]).rjust(12) if c in row else "-".rjust(12)
                                                          for c in columns))
    if report.examples:
        lines += ["", "examples:"]
        for ref, hyp in report.examples:
            lines += [f"  ref: {ref}", f"  hyp: {hyp}"]
    if report.confusion is not None:
        matrix = np.asarray(report.confusion)
        used = np.flatnonzero((matrix.sum(0) + matrix.sum(1)) > 0)[:max_confusion_labels]
        labels = [report.confusion_labels[i] for i in used]
        lines += ["", "confusion (rows: true, columns: predicted):",
                  format_confusion(labels, matrix[np.ix_(used, used)])]
    return lines


def _number(value: float) -> str:
    """Counts as integers, everything else to 4 decimals."""
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}"
