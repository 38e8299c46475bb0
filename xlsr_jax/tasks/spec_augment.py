"""SpecAugment masks for fine-tuning tasks, drawn in the input pipeline from the model config's fields."""

from __future__ import annotations

import numpy as np

from xlsr_jax.config import Wav2Vec2Config
from xlsr_jax.objectives.masking import row_generators, row_span_masks


def batch_axes(model: Wav2Vec2Config) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of the masks `spec_augment_masks` makes for `model` (none when it makes none)."""
    axes = {}
    if model.apply_spec_augment and model.mask_time_prob > 0:
        axes["mask_time_indices"] = ("batch", "frames")
    if model.apply_spec_augment and model.mask_feature_prob > 0:
        axes["mask_feature_indices"] = ("batch", None)
    return axes


def spec_augment_masks(model: Wav2Vec2Config, raw: dict, seed: int, rng: np.random.Generator) -> dict:
    """Time masks (`mask_time_indices` [B, T], mask_time_prob/length/min_masks) and channel masks
    (`mask_feature_indices` [B, hidden], mask_feature_prob/length/min_masks: fairseq's mask_channel_*)
    for a raw padded batch, each row from a generator seeded by the record's stream position."""
    out = {}
    rows = len(raw["lengths"])
    keys = batch_axes(model)
    if "mask_time_indices" in keys:
        frames = int(model.num_frames(raw["input_values"].shape[1]))
        rngs = row_generators(seed, 5, raw.get("positions"), rows, rng)
        out["mask_time_indices"] = row_span_masks(frames, np.asarray(model.num_frames(raw["lengths"])),
                                                  model.mask_time_prob, model.mask_time_length,
                                                  model.mask_time_min_masks, rngs)
    if "mask_feature_indices" in keys:
        rngs = row_generators(seed, 6, raw.get("positions"), rows, rng)
        out["mask_feature_indices"] = row_span_masks(model.hidden_size, np.full(rows, model.hidden_size),
                                                     model.mask_feature_prob, model.mask_feature_length,
                                                     model.mask_feature_min_masks, rngs)
    return out
