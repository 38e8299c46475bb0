"""Contrastive pretraining (wav2vec 2.0): span masks and negatives from the pipeline, InfoNCE + diversity."""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from xlsr_jax.config import ConfigError, Wav2Vec2Config
from xlsr_jax.objectives.contrastive import ContrastiveObjective
from xlsr_jax.objectives.masking import row_generators, row_span_masks, sample_negatives
from xlsr_jax.tasks import Task

SUM_METRICS = ("num_masked",)  # counts: summed over micro-batches
BATCH_AXES = {
    "input_values": ("batch", "samples"),
    "attention_mask": ("batch", "samples"),
    "mask_time_indices": ("batch", "frames"),
    "sampled_negatives": ("batch", "frames", None),
}


@dataclasses.dataclass(frozen=True)
class PretrainTargets:
    """`mask_time_indices` [B, T] bool and `sampled_negatives` [B, T, K] int32 for contrastive pretraining.

    T = `model.num_frames(L)` for the bucket's padded length L; spans and negatives stay inside
    each utterance's own `model.num_frames(length)` frames, drawn from a generator seeded by the
    record's stream position (1 host x 8 devices and 2 x 4 train on identical batches). Defaults
    follow fairseq's pretraining recipe (mask_prob 0.65), not the model config's fine-tuning
    SpecAugment probability.
    """

    model: Wav2Vec2Config
    mask_prob: float = 0.65
    crop: bool = True  # long records are randomly cropped to max_sample_size
    seed: int = 0  # with the record's stream position, seeds its mask and negatives

    def check(self, min_sample_size: int) -> None:
        """Raise if the shortest record the pipeline keeps makes fewer than 2 frames."""
        if self.model.num_frames(min_sample_size) < 2:
            raise ConfigError(
                f"min_sample_size={min_sample_size} gives {self.model.num_frames(min_sample_size)} frames; "
                "contrastive pretraining needs at least 2 per utterance (>= 720 samples)"
            )

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        m = self.model
        frames = int(m.num_frames(raw["input_values"].shape[1]))
        rngs = row_generators(self.seed, 4, raw.get("positions"), len(raw["lengths"]), rng)
        mask = row_span_masks(frames, np.asarray(m.num_frames(raw["lengths"])), self.mask_prob, m.mask_time_length,
                              m.mask_time_min_masks, rngs)
        negatives = np.stack([sample_negatives(mask[r : r + 1], m.num_negatives, row_rng)[0]
                              for r, row_rng in enumerate(rngs)])
        return {
            "input_values": raw["input_values"],
            "attention_mask": raw["attention_mask"],
            "mask_time_indices": mask,
            "sampled_negatives": negatives.astype(np.int32),
            "lengths": raw["lengths"],
        }


def make(config: ml_collections.ConfigDict, model_config: Wav2Vec2Config, data_dir, workdir) -> Task:
    del data_dir, workdir
    d, o = config.data, config.objective
    objective = ContrastiveObjective(gumbel_start=o.gumbel_start, gumbel_floor=o.gumbel_floor,
                                     gumbel_decay=o.gumbel_decay, feature_penalty_weight=o.feature_penalty_weight,
                                     perplexity_groups=int(o.get("perplexity_groups", 1)))
    return Task(
        name="pretraining", model_config=model_config, objective=objective,
        train_targets=PretrainTargets(model_config, mask_prob=d.mask_prob, seed=d.seed),
        eval_targets=PretrainTargets(model_config, mask_prob=d.mask_prob, seed=d.seed + 1000),
        batch_axes=dict(BATCH_AXES), sum_metrics=SUM_METRICS, best_metric=("loss", "min"),
    )  # fmt: skip


def exported_model(config, model_config: Wav2Vec2Config, workdir):
    del config, workdir
    return model_config, ()
