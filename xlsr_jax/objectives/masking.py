"""Span masks and negative indices for contrastive pretraining, in NumPy for the input pipeline.

Both run on the host per batch (fairseq semantics), so the jitted step sees only static-shape
arrays: `mask_time_indices` [B, T] bool and `sampled_negatives` [B, T, K] int32 frame indices
within the same utterance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def compute_span_mask(
    num_frames: int,
    lengths: Sequence[int] | np.ndarray,
    mask_prob: float,
    mask_length: int,
    rng: np.random.Generator,
    min_masks: int = 0,
    require_same_masks: bool = True,
) -> np.ndarray:
    """Boolean [B, num_frames] span mask, fairseq `compute_mask_indices` ("static" spans, overlap allowed).

    Per utterance of `length` real frames, int(mask_prob * length / mask_length + U[0,1)) span starts
    (at least `min_masks`) are drawn without replacement, each span covers `mask_length` frames and
    is clipped at the utterance end, so no padding frame is ever masked. Spans may overlap: with
    mask_prob 0.65 and length 10 about 1 - (1 - 0.065)**10 = 49% of frames are masked.
    `require_same_masks` subsamples every utterance down to the batch's smallest masked count, as
    fairseq does, so each utterance contributes the same number of targets.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {lengths.shape}")
    if (lengths > num_frames).any() or (lengths < 1).any():
        raise ValueError(f"every length must be in [1, {num_frames}], got {lengths.tolist()}")
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    mask = np.zeros((len(lengths), num_frames), dtype=bool)
    chosen = []
    for size in lengths:
        num_spans = max(min_masks, int(mask_prob * size / float(mask_length) + rng.random()))
        span = mask_length
        if size - span <= num_spans:  # fairseq: shrink spans so that enough distinct starts exist
            span = max(size - num_spans - 1, 0)
        num_spans = min(num_spans, max(size - span, 0))
        if num_spans == 0:
            chosen.append(np.zeros(0, dtype=np.int64))
            continue
        starts = rng.choice(size - span, num_spans, replace=False)
        idx = (starts[:, None] + np.arange(max(mask_length, 1))[None, :]).reshape(-1)
        chosen.append(np.unique(idx[idx < size]))
    smallest = min(len(c) for c in chosen)
    for i, idx in enumerate(chosen):
        if require_same_masks and len(idx) > smallest:
            idx = rng.choice(idx, smallest, replace=False)
        mask[i, idx] = True
    return mask


def sample_negatives(mask: np.ndarray, num_negatives: int, rng: np.random.Generator) -> np.ndarray:
    """[B, T, K] int32: for each masked frame, K distractor frames of the same utterance.

    Distractors are drawn uniformly with replacement from the *other* masked frames of the same
    utterance (fairseq `sample_negatives`, cross_sample_negatives=0): never the positive itself,
    never an unmasked or padding frame. Rows of unmasked frames point at the frame itself (they are
    ignored by the loss). An utterance with a single masked frame has no distractor: its row points
    at itself and the loss masks it out.
    """
    batch, frames = mask.shape
    out = np.broadcast_to(np.arange(frames, dtype=np.int32)[None, :, None], (batch, frames, num_negatives)).copy()
    for b in range(batch):
        positions = np.flatnonzero(mask[b])
        m = len(positions)
        if m < 2:
            continue
        draw = rng.integers(0, m - 1, size=(m, num_negatives))
        draw += draw >= np.arange(m)[:, None]  # skip the positive, keep the rest uniform
        out[b, positions] = positions[draw]
    return out


def expected_masked_fraction(mask_prob: float, mask_length: int) -> float:
    """Fraction of frames a long utterance has masked when spans overlap freely."""
    return 1.0 - (1.0 - mask_prob / mask_length) ** mask_length


def row_span_masks(num_frames: int, frame_lengths: np.ndarray, mask_prob: float, mask_length: int,
                   min_masks: int, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """[B, num_frames] span masks drawn row by row, row r from `rngs[r]` (one utterance each).

    Per-row generators seeded by a record's global stream position make a row's mask independent
    of which host reads it and of the host count; equal mask counts across rows (fairseq's
    require_same_masks) are unnecessary because the losses take a [B, T] mask.
    """
    return np.stack([compute_span_mask(num_frames, [length], mask_prob, mask_length, rng, min_masks=min_masks)[0]
                     for length, rng in zip(frame_lengths, rngs)])


def row_generators(seed: int, salt: int, positions: np.ndarray | None, count: int,
                   fallback: np.random.Generator) -> list[np.random.Generator]:
    """One generator per row from (seed, salt, stream position); `fallback` for every row without positions."""
    if positions is None:
        return [fallback] * count
    return [np.random.default_rng([seed, salt, int(p)]) for p in positions]
