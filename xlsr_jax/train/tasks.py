"""What differs between training tasks: objective, pipeline targets, the batch keys the step takes.

A new task is a new branch here (and an objective module), not a new loop.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import ml_collections
from etils import epath

from data_pipelines.records import DatasetIndex, decode_metadata
from data_pipelines.targets import CtcTargets, PretrainTargets
from data_pipelines.vocab import Vocabulary
from xlsr_jax.config import ConfigError, Wav2Vec2Config
from xlsr_jax.objectives.contrastive import ContrastiveObjective
from xlsr_jax.objectives.ctc import CtcObjective


@dataclasses.dataclass
class Task:
    model_config: Wav2Vec2Config
    objective: object
    train_targets: object
    eval_targets: object
    step_keys: tuple[str, ...]
    extra_files: tuple[pathlib.Path, ...] = ()  # copied into exported model directories


def split_texts(data_dir: str | pathlib.Path, split: str) -> list[str]:
    """Every transcript of a prepared split (metadata only; audio is not decoded)."""
    import grain

    index = DatasetIndex.load(data_dir)
    source = grain.sources.ArrayRecordDataSource([str(p) for p in index.shard_paths(data_dir, split)])
    return [decode_metadata(source[i])[0].get("text", "") for i in range(len(source))]


def ctc_vocabulary(config: ml_collections.ConfigDict, data_dir: pathlib.Path, workdir: pathlib.Path) -> Vocabulary:
    """The run's character vocabulary: `data.vocab` if given, else built once from the train transcripts
    and kept in WORKDIR/vocab.json so a resumed run uses the same label ids."""
    from jax.experimental import multihost_utils

    if config.data.get("vocab"):
        return Vocabulary.load(config.data.vocab)
    path = epath.Path(workdir) / "vocab.json"
    if jax.process_index() == 0 and not path.is_file():
        texts = split_texts(data_dir, config.data.train_split)
        if not any(t.strip() for t in texts):
            raise ConfigError(f"split {config.data.train_split!r} of {data_dir} has no transcripts: CTC needs them")
        Vocabulary.from_texts(texts).save(path)
    multihost_utils.sync_global_devices("xlsr_jax_vocab")
    return Vocabulary.load(path)


def make_task(config: ml_collections.ConfigDict, model_config: Wav2Vec2Config, data_dir: pathlib.Path | None,
              workdir: pathlib.Path | None, vocab: Vocabulary | None = None) -> Task:
    """The task `config.head` trains; `vocab` (CTC) skips reading or building the run's vocabulary."""
    d = config.data
    if config.head == "pretraining":
        o = config.objective
        objective = ContrastiveObjective(gumbel_start=o.gumbel_start, gumbel_floor=o.gumbel_floor,
                                         gumbel_decay=o.gumbel_decay, feature_penalty_weight=o.feature_penalty_weight)
        return Task(
            model_config, objective,
            PretrainTargets(model_config, mask_prob=d.mask_prob, seed=d.seed),
            PretrainTargets(model_config, mask_prob=d.mask_prob, seed=d.seed + 1000),
            ("input_values", "attention_mask", "mask_time_indices", "sampled_negatives"),
        )  # fmt: skip
    if config.head == "ctc":
        vocab = vocab if vocab is not None else ctc_vocabulary(config, data_dir, workdir)
        model_config = model_config.replace(vocab_size=len(vocab), pad_token_id=0)
        keys = ("input_values", "attention_mask", "labels") + (("mask_time_indices",) if d.mask_prob > 0 else ())
        vocab_file = epath.Path(d.vocab) if d.get("vocab") or workdir is None else epath.Path(workdir) / "vocab.json"
        return Task(
            model_config, CtcObjective(zero_infinity=True),
            CtcTargets(vocab, lowercase=d.get("lowercase", False), model=model_config, mask_prob=d.mask_prob,
                       seed=d.seed),
            CtcTargets(vocab, lowercase=d.get("lowercase", False)),
            keys, (vocab_file,),
        )  # fmt: skip
    raise ConfigError(f"head {config.head!r} does not train yet; choose 'pretraining' or 'ctc'")
