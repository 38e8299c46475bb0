"""CTC fine-tuning (ASR): character labels, SpecAugment from the pipeline, greedy decoding, WER/CER.

The run's vocabulary rule lives here once: `data.vocab` if given, else WORKDIR/vocab.json, built
from the train transcripts on the first start and reused on every resume and by `export`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from data_pipelines.records import DatasetIndex, decode_metadata
from data_pipelines.vocab import SPECIAL_TOKENS, Vocabulary, pad_labels
from xlsr_jax.config import ConfigError, Wav2Vec2Config
from xlsr_jax.model_dir import ModelDirError
from xlsr_jax.objectives import ctc as ctc_objective
from xlsr_jax.tasks import Task
from xlsr_jax.tasks import spec_augment

log = logging.getLogger(__name__)

BLANK_ID = 0  # `<pad>`: the CTC blank of Hugging Face and fairseq CTC checkpoints
PLACEHOLDER_VOCAB_SIZE = 32  # `xlsr-jax fit` without data: a character vocabulary is ~30-60 tokens


@dataclasses.dataclass(frozen=True)
class CtcTargets:
    """`labels` [B, S] int32 padded with -100, plus SpecAugment masks when training.

    S is static per bucket: `label_length`, or the bucket's frame count L // 320 (a longer
    transcript cannot be aligned). Longer transcripts are truncated. Records longer than
    max_sample_size are dropped, not cropped: a crop would cut the audio away from its transcript.
    With `model` set, SpecAugment time and channel masks come from its config
    (`spec_augment.spec_augment_masks`). `texts` and `language_id` pass through for evaluation.
    """

    vocab: Vocabulary
    label_length: int | None = None
    lowercase: bool = False
    crop: bool = False
    model: Wav2Vec2Config | None = None  # None: no SpecAugment masks (evaluation)
    seed: int = 0

    def check(self, min_sample_size: int) -> None:
        """Nothing to check: every kept length works."""
        del min_sample_size

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        size = self.label_length or max(1, raw["input_values"].shape[1] // 320)
        texts = [normalize_text(t, self.lowercase) for t in raw["texts"]]
        labels, lengths = pad_labels([self.vocab.encode(t)[:size] for t in texts], size)
        out = {
            "input_values": raw["input_values"],
            "attention_mask": raw["attention_mask"],
            "labels": labels,
            "label_lengths": lengths,
            "lengths": raw["lengths"],
            "texts": texts,
            "language_id": raw["language_id"],
        }
        if self.model is not None:
            out.update(spec_augment.spec_augment_masks(self.model, raw, self.seed, rng))
        return out


def normalize_text(text: str, lowercase: bool) -> str:
    """The transcript as training sees it and evaluation scores it: optionally lowercased, single spaces."""
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def split_texts(data_dir: str | pathlib.Path, split: str) -> list[str]:
    """Every transcript of a prepared split (metadata only; audio is not decoded)."""
    import grain

    index = DatasetIndex.load(data_dir)
    source = grain.sources.ArrayRecordDataSource([str(p) for p in index.shard_paths(data_dir, split)])
    return [decode_metadata(source[i])[0].get("text", "") for i in range(len(source))]


def vocab_file(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
    """Where the run's vocabulary lives: `data.vocab`, else WORKDIR/vocab.json."""
    return epath.Path(config.data.vocab) if config.data.get("vocab") else epath.Path(workdir) / "vocab.json"


def run_vocabulary(config: ml_collections.ConfigDict, data_dir: pathlib.Path, workdir: epath.Path) -> Vocabulary:
    """The run's vocabulary, built from the train transcripts on the first start (process 0 writes it)."""
    from jax.experimental import multihost_utils

    path = vocab_file(config, workdir)
    if not config.data.get("vocab") and jax.process_index() == 0 and not path.is_file():
        texts = [normalize_text(t, config.data.get("lowercase", False))
                 for t in split_texts(data_dir, config.data.train_split)]
        if not any(texts):
            raise ConfigError(f"split {config.data.train_split!r} of {data_dir} has no transcripts: CTC needs them")
        Vocabulary.from_texts(texts).save(path)
    multihost_utils.sync_global_devices("xlsr_jax_vocab")
    if not path.is_file():
        raise ConfigError(f"data.vocab={str(path)!r} does not exist")
    return Vocabulary.load(path)


def placeholder_vocabulary(size: int = PLACEHOLDER_VOCAB_SIZE) -> Vocabulary:
    """A stand-in vocabulary of `size` tokens for compiling without data (`xlsr-jax fit`)."""
    chars = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(size - len(SPECIAL_TOKENS))]
    return Vocabulary(list(SPECIAL_TOKENS) + chars)


def predict(model, params, batch) -> dict[str, jax.Array]:
    """Per-row evaluation outputs: best id per frame, real frames, CTC loss, feasibility, target tokens."""
    out = ctc_objective.forward(model, params, batch, None, deterministic=True)
    per_utt, feasible = ctc_objective.per_utterance_loss(out.logits, out.encoder.frame_mask, batch["labels"], BLANK_ID)
    return {
        "ids": jnp.argmax(out.logits, -1).astype(jnp.int32),
        "frames": jnp.sum(out.encoder.frame_mask, -1).astype(jnp.int32),
        "loss": per_utt,
        "feasible": feasible,
        "tokens": jnp.sum(batch["labels"] >= 0, -1).astype(jnp.int32),
    }


def edit_counts(reference: str, hypothesis: str) -> tuple[int, int, int, int]:
    """(word errors, reference words, character errors, reference characters) of one utterance (jiwer)."""
    import jiwer

    words = len(reference.split())
    chars = len(reference)
    if not reference:  # nothing to recognize: every hypothesis word / character is an insertion
        return len(hypothesis.split()), 0, len(hypothesis), 0
    w = jiwer.process_words(reference, hypothesis)
    c = jiwer.process_characters(reference, hypothesis)
    return (w.substitutions + w.deletions + w.insertions, words,
            c.substitutions + c.deletions + c.insertions, chars)


class CtcEvaluator:
    """Greedy decoding -> WER and CER (overall and per language), loss per token, blank ratio of outputs.

    An all-blank model (the classic CTC failure) shows as blank_ratio 1.0 and CER 1.0.
    """

    def __init__(self, vocab: Vocabulary, languages: Sequence[str]):
        self.vocab = vocab
        self.languages = list(languages)
        keys = ["loss_sum", "tokens", "utterances", "infeasible", "blank_frames", "frames", "word_errors", "words",
                "char_errors", "chars"]
        keys += [f"{k}/{lang}" for lang in self.languages for k in ("word_errors", "words", "char_errors", "chars")]
        self._counts = collections.OrderedDict((k, 0.0) for k in keys)
        self.examples: list[tuple[str, str]] = []  # (reference, hypothesis) of the first rows, for the log

    def add(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        c = self._counts
        for r in np.flatnonzero(batch["valid"]):
            frames = int(outputs["frames"][r])
            best = outputs["ids"][r, :frames]
            hyp = self.vocab.decode(ctc_objective.collapse(best, BLANK_ID))
            ref = batch["texts"][r]
            we, nw, ce, nc = edit_counts(ref, hyp)
            lang = self.languages[int(batch["language_id"][r])] if self.languages else None
            for key, value in (("word_errors", we), ("words", nw), ("char_errors", ce), ("chars", nc)):
                c[key] += value
                if lang is not None:
                    c[f"{key}/{lang}"] += value
            c["blank_frames"] += float(np.sum(best == BLANK_ID))
            c["frames"] += frames
            c["utterances"] += 1
            if outputs["feasible"][r]:
                c["loss_sum"] += float(outputs["loss"][r])
                c["tokens"] += int(outputs["tokens"][r])
            else:
                c["infeasible"] += 1
            if len(self.examples) < 3:
                self.examples.append((ref, hyp))

    def counts(self) -> dict[str, float]:
        return dict(self._counts)

    def result(self, counts: Mapping[str, float]) -> dict[str, float]:
        out = {
            "loss": counts["loss_sum"] / max(counts["tokens"], 1.0),
            "wer": counts["word_errors"] / max(counts["words"], 1.0),
            "cer": counts["char_errors"] / max(counts["chars"], 1.0),
            "blank_ratio": counts["blank_frames"] / max(counts["frames"], 1.0),
            "num_utterances": counts["utterances"],
            "infeasible": counts["infeasible"],
        }
        for lang in self.languages:
            if counts[f"chars/{lang}"] > 0:
                out[f"wer/{lang}"] = counts[f"word_errors/{lang}"] / max(counts[f"words/{lang}"], 1.0)
                out[f"cer/{lang}"] = counts[f"char_errors/{lang}"] / counts[f"chars/{lang}"]
        return out


def batch_axes(model_config: Wav2Vec2Config, train: bool) -> dict[str, tuple[str | None, ...]]:
    axes = {"input_values": ("batch", "samples"), "attention_mask": ("batch", "samples"), "labels": ("batch", None)}
    return {**axes, **spec_augment.batch_axes(model_config)} if train else axes


def make(config: ml_collections.ConfigDict, model_config: Wav2Vec2Config, data_dir, workdir) -> Task:
    d = config.data
    if data_dir is None or workdir is None:
        vocab = Vocabulary.load(d.vocab) if d.get("vocab") else placeholder_vocabulary()
        extra = ()
    else:
        vocab = run_vocabulary(config, data_dir, workdir)
        extra = (vocab_file(config, workdir),)
    model_config = model_config.replace(vocab_size=len(vocab), pad_token_id=BLANK_ID)
    lowercase = d.get("lowercase", False)
    languages = list(DatasetIndex.load(data_dir).languages) if data_dir is not None else []
    objective = ctc_objective.CtcObjective(blank_id=BLANK_ID, sentence_avg=config.objective.get("sentence_avg", False))
    return Task(
        name="ctc", model_config=model_config, objective=objective,
        train_targets=CtcTargets(vocab, lowercase=lowercase, model=model_config, seed=d.seed),
        eval_targets=CtcTargets(vocab, lowercase=lowercase),
        batch_axes=batch_axes(model_config, train=True),
        sum_metrics=("num_tokens", "num_utterances", "infeasible"),
        extra_files=extra,
        predict=predict, eval_axes=batch_axes(model_config, train=False),
        make_evaluator=lambda: CtcEvaluator(vocab, languages),
        best_metric=("wer", "min"),
    )  # fmt: skip


def exported_model(config: ml_collections.ConfigDict, model_config: Wav2Vec2Config, workdir: epath.Path):
    """The vocabulary the run trained with sets the output size and travels with the model."""
    path = vocab_file(config, workdir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the run's CTC vocabulary is missing; the model cannot be exported without it")
    return model_config.replace(vocab_size=len(Vocabulary.load(path)), pad_token_id=BLANK_ID), (path,)


def model_vocabulary(model_dir: str | pathlib.Path, model_config: Wav2Vec2Config) -> Vocabulary:
    """A CTC model directory's vocab.json, checked against the model's output size."""
    path = pathlib.Path(model_dir) / "vocab.json"
    if not path.is_file():
        raise ModelDirError(f"{model_dir} is a CTC model directory without vocab.json: nothing to spell with")
    try:
        vocab = Vocabulary.load(path)
    except (ValueError, KeyError, AttributeError, TypeError) as e:  # the others: not a {token: id} map
        raise ModelDirError(f"{path} is not a CTC vocabulary: {e}") from e
    if len(vocab) != model_config.vocab_size:
        raise ModelDirError(f"{path} has {len(vocab)} tokens, the model vocab_size={model_config.vocab_size}")
    return vocab


def evaluation_task(model_config: Wav2Vec2Config, model_dir: str | pathlib.Path, data_dir: str | pathlib.Path,
                    lowercase: bool | None = None) -> Task:
    """Scoring a CTC model directory on a prepared data set: WER/CER overall and per data-set language.

    `lowercase=None` lowercases the references when the vocabulary has no uppercase letter: such a
    model can only spell its vocabulary's characters, so cased references would count every capital
    as an error the model cannot avoid.
    """
    vocab = model_vocabulary(model_dir, model_config)
    if lowercase is None:
        lowercase = not any(ch.isupper() for token in vocab.tokens[len(SPECIAL_TOKENS):] for ch in token)
    languages = list(DatasetIndex.load(data_dir).languages)
    return Task(
        name="ctc", model_config=model_config, objective=None, train_targets=None,
        eval_targets=CtcTargets(vocab, lowercase=lowercase), batch_axes={},
        predict=predict, eval_axes=batch_axes(model_config, train=False),
        make_evaluator=lambda: CtcEvaluator(vocab, languages),
        best_metric=("wer", "min"),
    )  # fmt: skip
