"""Per-task batch completion: raw padded audio -> exactly the arrays the train step consumes.

Each target is a grain `random_map` transform: `(raw batch, rng) -> batch dict`. grain seeds `rng`
from (pipeline seed, batch index), so resuming at batch i draws the same masks as an uninterrupted run.
The raw batch holds `input_values` [B, L] float32, `attention_mask` [B, L] int32, `lengths` [B]
samples, `texts` (list of str) and `language_id` [B] int32.
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
        frames = int(self.model.num_frames(raw["input_values"].shape[1]))
        lengths = np.asarray(self.model.num_frames(raw["lengths"]))
        k = self.model.num_negatives
        mask = np.zeros((len(lengths), frames), dtype=bool)
        negatives = np.zeros((len(lengths), frames, k), dtype=np.int32)
        # One generator per row, seeded by the record's global stream position: a row's mask and
        # negatives do not depend on which host reads it or on the host count, so 1 process x 8
        # devices and 2 processes x 4 devices train on identical batches. Equal mask counts across
        # rows (fairseq's require_same_masks) are unnecessary: the loss takes a [B, T] mask.
        positions = raw.get("positions")
        for row, length in enumerate(lengths):
            row_rng = np.random.default_rng([self.seed, 4, int(positions[row])]) if positions is not None else rng
            mask[row] = compute_span_mask(frames, [length], self.mask_prob, self.model.mask_time_length, row_rng,
                                          min_masks=self.model.mask_time_min_masks)[0]
            negatives[row] = sample_negatives(mask[row : row + 1], k, row_rng)[0]
        return {
            "input_values": raw["input_values"],
            "attention_mask": raw["attention_mask"],
            "mask_time_indices": mask,
            "sampled_negatives": negatives,
        }


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
        }
        if self.mask_prob > 0 and self.model is not None:
            frames = int(self.model.num_frames(raw["input_values"].shape[1]))
            lengths_f = np.asarray(self.model.num_frames(raw["lengths"]))
            mask = np.zeros((len(lengths_f), frames), dtype=bool)
            positions = raw.get("positions")
            for row, length in enumerate(lengths_f):
                row_rng = np.random.default_rng([self.seed, 5, int(positions[row])]) if positions is not None else rng
                mask[row] = compute_span_mask(frames, [length], self.mask_prob, self.model.mask_time_length, row_rng,
                                              min_masks=self.model.mask_time_min_masks)[0]
            out["mask_time_indices"] = mask
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
        }


Targets = PretrainTargets | CtcTargets | LanguageTargets
