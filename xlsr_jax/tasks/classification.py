"""Utterance classification: language ID with the prepared data set's languages as labels.

Labels are the data set's `languages` (dataset.json), written to WORKDIR/labels.json on the
first start so that a resumed run and `export` use the same label ids (`id2label` of the model).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
import optax
from etils import epath

from data_pipelines.errors import UserError
from data_pipelines.records import DatasetIndex
from xlsr_jax.config import ConfigError, Wav2Vec2Config
from xlsr_jax.objectives import classification as cls_objective
from xlsr_jax.tasks import Task, spec_augment

PLACEHOLDER_NUM_LABELS = 128  # `xlsr-jax fit` without data: XLS-R's language count


@dataclasses.dataclass(frozen=True)
class LanguageTargets:
    """`language_id` [B] int32 (index into the data set's `languages`), plus SpecAugment masks when
    training (`model` set). Long records are randomly cropped: any part of an utterance has its language."""

    crop: bool = True
    model: Wav2Vec2Config | None = None
    seed: int = 0

    def check(self, min_sample_size: int) -> None:
        """Nothing to check: every kept length works."""
        del min_sample_size

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        out = {
            "input_values": raw["input_values"],
            "attention_mask": raw["attention_mask"],
            "language_id": raw["language_id"],
            "lengths": raw["lengths"],
        }
        if self.model is not None:
            out.update(spec_augment.spec_augment_masks(self.model, raw, self.seed, rng))
        return out


def labels_file(workdir: epath.Path) -> epath.Path:
    return epath.Path(workdir) / "labels.json"


def run_labels(data_dir: pathlib.Path, workdir: epath.Path) -> list[str]:
    """The run's label names: the data set's languages, kept in WORKDIR/labels.json from the first start."""
    from jax.experimental import multihost_utils

    path = labels_file(workdir)
    if jax.process_index() == 0 and not path.is_file():
        languages = list(DatasetIndex.load(data_dir).languages)
        if len(languages) < 2:
            raise ConfigError(f"{data_dir} has {len(languages)} language(s) in dataset.json; language ID needs >= 2 "
                              "(prepare with a layout or manifest that records languages)")
        path.write_text(json.dumps(languages, ensure_ascii=False) + "\n")
    multihost_utils.sync_global_devices("xlsr_jax_labels")
    labels = json.loads(path.read_text())
    current = list(DatasetIndex.load(data_dir).languages)
    if current != labels:
        raise ConfigError(f"{data_dir} has languages {current}, but this run trained with {labels} ({path}); "
                          "use the data set the run started with, or a new workdir")
    return labels


def predict(model, params, batch) -> dict[str, jax.Array]:
    """Per-row evaluation outputs: log-probabilities over the labels and the cross-entropy."""
    logits = cls_objective.forward(model, params, batch, None, deterministic=True).logits
    log_probs = jax.nn.log_softmax(logits, -1)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["language_id"])
    return {"log_probs": log_probs, "loss": loss}


class ClassificationEvaluator:
    """Accuracy (overall and per true label), mean cross-entropy and the confusion matrix."""

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        n = len(self.labels)
        self._confusion = np.zeros((n, n), np.float64)  # [true, predicted]
        self._loss = 0.0

    def add(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        rows = np.flatnonzero(batch["valid"])
        predicted = np.argmax(outputs["log_probs"][rows], -1)
        np.add.at(self._confusion, (np.asarray(batch["language_id"])[rows], predicted), 1.0)
        self._loss += float(np.sum(outputs["loss"][rows]))

    def counts(self) -> dict[str, float]:
        out = {"loss_sum": self._loss}
        n = len(self.labels)
        out.update({f"confusion/{i}/{j}": float(self._confusion[i, j]) for i in range(n) for j in range(n)})
        return out

    def confusion(self, counts: Mapping[str, float]) -> np.ndarray:
        """[true, predicted] counts from summed `counts`."""
        n = len(self.labels)
        return np.asarray([[counts[f"confusion/{i}/{j}"] for j in range(n)] for i in range(n)])

    def result(self, counts: Mapping[str, float]) -> dict[str, float]:
        confusion = self.confusion(counts)
        total = confusion.sum()
        out = {"accuracy": float(np.trace(confusion) / max(total, 1.0)), "loss": float(counts["loss_sum"] / max(total, 1.0)),
               "num_utterances": float(total)}
        for i, label in enumerate(self.labels):
            if confusion[i].sum() > 0:
                out[f"accuracy/{label}"] = float(confusion[i, i] / confusion[i].sum())
        return out


def format_confusion(labels: Sequence[str], confusion: np.ndarray) -> str:
    """The confusion matrix as a text table (rows: true label, columns: predicted)."""
    corner = "true\\pred"
    width = max(len(corner) + 1, *(len(x) + 1 for x in labels))
    lines = [corner.ljust(width) + "".join(x.rjust(width) for x in labels)]
    for label, row in zip(labels, confusion):
        lines.append(label.ljust(width) + "".join(str(int(v)).rjust(width) for v in row))
    return "\n".join(lines)


def make(config: ml_collections.ConfigDict, model_config: Wav2Vec2Config, data_dir, workdir) -> Task:
    d = config.data
    if data_dir is None or workdir is None:
        n = model_config.num_labels if model_config.id2label else PLACEHOLDER_NUM_LABELS
        labels = list(model_config.id2label) or [f"LABEL_{i}" for i in range(n)]
        extra = ()
    else:
        labels = run_labels(data_dir, workdir)
        extra = (labels_file(workdir),)
    model_config = model_config.replace(num_labels=len(labels), id2label=tuple(labels))
    axes = {"input_values": ("batch", "samples"), "attention_mask": ("batch", "samples"), "language_id": ("batch",)}
    return Task(
        name="sequence_classification", model_config=model_config,
        objective=cls_objective.ClassificationObjective(),
        train_targets=LanguageTargets(model=model_config, seed=d.seed),
        eval_targets=LanguageTargets(crop=False),
        batch_axes={**axes, **spec_augment.batch_axes(model_config)},
        sum_metrics=("num_utterances",),
        extra_files=extra,
        predict=predict, eval_axes=axes,
        make_evaluator=lambda: ClassificationEvaluator(labels),
        best_metric=("accuracy", "max"),
    )  # fmt: skip


def exported_model(config: ml_collections.ConfigDict, model_config: Wav2Vec2Config, workdir: epath.Path):
    """The labels the run trained with become the model's `id2label`."""
    del config
    path = labels_file(workdir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run's label list is missing; the model cannot be exported without it")
    labels = json.loads(path.read_text())
    return model_config.replace(num_labels=len(labels), id2label=tuple(labels)), ()


@dataclasses.dataclass(frozen=True)
class ModelLabelTargets:
    """`LanguageTargets` (evaluation) with `language_id` turned into the model's label id of each record's
    language: `label_ids[data-set language id]` (-1: a language the model does not know)."""

    label_ids: tuple[int, ...]
    crop: bool = False

    def check(self, min_sample_size: int) -> None:
        """Nothing to check: every kept length works."""
        del min_sample_size

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        ids = np.asarray(self.label_ids, np.int32)[np.asarray(raw["language_id"])]
        if np.any(ids < 0):
            raise UserError("a record's language is not among the model's labels")
        return {**LanguageTargets(crop=False)(raw, rng), "language_id": ids}


def evaluation_task(model_config: Wav2Vec2Config, data_dir: str | pathlib.Path, split: str) -> Task:
    """Scoring a language-ID model directory on `split`: its `id2label` is matched to the data set's
    languages by name, so the two may order them differently and the model may know more languages.

    Raises ConfigError naming the languages of `split` the model has no label for.
    """
    labels = list(model_config.id2label)
    if not labels:
        raise ConfigError("the model's config.json has no id2label: its outputs cannot be matched to the data "
                          "set's languages by name")
    index = DatasetIndex.load(data_dir)
    present = [index.languages[i] for i in np.unique(index.language_ids(data_dir, split))]
    unknown = [lang for lang in present if lang not in labels]
    if unknown:
        raise ConfigError(f"split {split!r} of {data_dir} has language(s) {unknown} the model does not know "
                          f"(its labels: {labels})")
    label_ids = tuple(labels.index(lang) if lang in labels else -1 for lang in index.languages)
    return Task(
        name="sequence_classification", model_config=model_config, objective=None, train_targets=None,
        eval_targets=ModelLabelTargets(label_ids), batch_axes={},
        predict=predict,
        eval_axes={"input_values": ("batch", "samples"), "attention_mask": ("batch", "samples"),
                   "language_id": ("batch",)},
        make_evaluator=lambda: ClassificationEvaluator(labels),
        best_metric=("accuracy", "max"),
    )  # fmt: skip
