"""Per-task batch completion: raw padded audio -> exactly the arrays the train step consumes.

Each target is a grain `random_map` transform: `(raw batch, rng) -> batch dict`. grain seeds `rng`
from (pipeline seed, batch index), so resuming at batch i draws the same masks as an uninterrupted run.
The raw batch holds `input_values` [B, L] float32, `attention_mask` [B, L] int32, `lengths` [B]
samples, `texts` (list of str) and `language_id` [B] int32. Every target passes `lengths` through
(host-side bookkeeping such as audio seconds per step; the train step does not take it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.vocab import Vocabulary, pad_labels
from xlsr_jax.config import Wav2Vec2Config
from xlsr_jax.objectives.masking import compute_span_mask, sample_negatives


@dataclasses.dataclass(frozen=True)
class PretrainTargets:
    """`mask_time_indices` [B, T] bool and `sampled_negatives` [B, T, K] int32 for contrastive pretraining.

    T = `model.num_frames(L)` for the bucket's padded length L; spans and negatives stay inside
    each utterance's own `model.num_frames(length)` frames. Defaults follow fairseq's pretraining
    recipe (mask_prob 0.65), not the model config's fine-tuning SpecAugment probability.
    """

    model: Wav2Vec2Config
    mask_prob: float = 0.65
    crop: bool = True  # long records are randomly cropped to max_sample_size
    seed: int = 0  # with the record's stream position, seeds its mask and negatives

    def check(self, min_sample_size: int) -> None:
        """Raise if the shortest record the pipeline keeps makes fewer than 2 frames."""
        if self.model.num_frames(min_sample_size) < 2:
            raise ValueError(
                f"min_sample_size={min_sample_size} gives {self.model.num_frames(min_sample_size)} frames; "
                "contrastive pretraining needs at least 2 per utterance (>= 720 samples)"
            )

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        k = self.model.num_negatives
        mask, rngs = _row_span_masks(self.model, raw, self.mask_prob, self.seed, 4, rng)
        negatives = np.stack([sample_negatives(mask[r : r + 1], k, row_rng)[0] for r, row_rng in enumerate(rngs)])
        return {
            "input_values": raw["input_values"],
            "attention_mask": raw["attention_mask"],
            "mask_time_indices": mask,
            "sampled_negatives": negatives.astype(np.int32),
            "lengths": raw["lengths"],
        }


def _row_span_masks(model: Wav2Vec2Config, raw: dict, mask_prob: float, seed: int, salt: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, list[np.random.Generator]]:
    """[B, T] span masks, one generator per row seeded by the record's global stream position.

    A row's mask (and whatever else its generator draws next, e.g. negatives) then does not depend
    on which host reads it or on the host count: 1 process x 8 devices and 2 x 4 train on identical
    batches. Equal mask counts across rows (fairseq's require_same_masks) are unnecessary: the
    losses take a [B, T] mask.
    """
    frames = int(model.num_frames(raw["input_values"].shape[1]))
    lengths = np.asarray(model.num_frames(raw["lengths"]))
    positions = raw.get("positions")
    rngs = [np.random.default_rng([seed, salt, int(positions[r])]) if positions is not None else rng
            for r in range(len(lengths))]
    mask = np.stack([compute_span_mask(frames, [length], mask_prob, model.mask_time_length, row_rng,
                                       min_masks=model.mask_time_min_masks)[0]
                     for length, row_rng in zip(lengths, rngs)])
    return mask, rngs


@dataclasses.dataclass(frozen=True)
class CtcTargets:
    """`labels` [B, S] int32 padded with -100 and `label_lengths` [B] for CTC fine-tuning.

    S is static per bucket: `label_length`, or the bucket's frame count L // 320 (a longer
    transcript cannot be aligned). Longer transcripts are truncated. Records longer than
    max_sample_size are dropped, not cropped: a crop would cut the audio away from its transcript.
    """

    vocab: Vocabulary
    label_length: int | None = None
    lowercase: bool = False
    crop: bool = False

    def check(self, min_sample_size: int) -> None:
        """Nothing to check: every kept length works."""
        del min_sample_size

    # SpecAugment time masks for fine-tuning (fairseq mask_prob 0.75 in the XLS-R recipe); 0: none.
    model: Wav2Vec2Config | None = None
    mask_prob: float = 0.0
    seed: int = 0

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        size = self.label_length or max(1, raw["input_values"].shape[1] // 320)
        texts = [t.lower() for t in raw["texts"]] if self.lowercase else raw["texts"]
        labels, lengths = pad_labels([self.vocab.encode(t)[:size] for t in texts], size)
        out = {
            "input_values": raw["input_values"],
            "attention_mask": raw["attention_mask"],
            "labels": labels,
            "label_lengths": lengths,
            "lengths": raw["lengths"],
        }
        if self.mask_prob > 0 and self.model is not None:
            out["mask_time_indices"], _ = _row_span_masks(self.model, raw, self.mask_prob, self.seed, 5, rng)
        return out


@dataclasses.dataclass(frozen=True)
class LanguageTargets:
    """`language_id` [B] int32 (index into the data set's `languages`) for classification."""

    crop: bool = True

    def check(self, min_sample_size: int) -> None:
        """Nothing to check: every kept length works."""
        del min_sample_size

    def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
        del rng
        return {
            "input_values": raw["input_values"],
            "attention_mask": raw["attention_mask"],
            "language_id": raw["language_id"],
            "lengths": raw["lengths"],
        }


Targets = PretrainTargets | CtcTargets | LanguageTargets
