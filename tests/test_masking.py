"""Span masks and negatives: property tests over random lengths and seeds (fairseq semantics)."""

import numpy as np
import pytest

from xlsr_jax.objectives.masking import compute_span_mask, expected_masked_fraction, sample_negatives


@pytest.mark.parametrize("seed", range(20))
def test_masks_and_negatives_respect_lengths(seed):
    rng = np.random.default_rng(seed)
    frames = int(rng.integers(30, 400))
    lengths = rng.integers(12, frames + 1, size=int(rng.integers(1, 6)))
    lengths[0] = frames
    same = bool(seed % 2)
    mask = compute_span_mask(frames, lengths, 0.65, 10, np.random.default_rng(seed), min_masks=2,
                             require_same_masks=same)
    assert mask.shape == (len(lengths), frames) and mask.dtype == bool
    for b, n in enumerate(lengths):
        assert not mask[b, n:].any(), "a padding frame is masked"
        assert mask[b, :n].sum() >= 2
    if same:
        assert len(set(mask.sum(1).tolist())) == 1
    negs = sample_negatives(mask, 100, np.random.default_rng(seed + 1))
    assert negs.shape == (len(lengths), frames, 100) and negs.dtype == np.int32
    for b in range(len(lengths)):
        positions = np.flatnonzero(mask[b])
        for t in positions:
            row = negs[b, t]
            assert (row != t).all(), "a negative equals its positive"
            assert mask[b, row].all(), "a negative is not a masked frame of the utterance"
            assert (row < lengths[b]).all(), "a negative lies in padding"


def test_identical_seed_identical_output_and_different_seed_differs():
    a = compute_span_mask(200, [200, 150], 0.65, 10, np.random.default_rng(7))
    b = compute_span_mask(200, [200, 150], 0.65, 10, np.random.default_rng(7))
    c = compute_span_mask(200, [200, 150], 0.65, 10, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    na, nb = (sample_negatives(a, 10, np.random.default_rng(3)) for _ in range(2))
    np.testing.assert_array_equal(na, nb)


def test_masked_fraction_matches_expectation():
    """mask_prob 0.65, length 10 on long utterances: ~49% of frames masked (spans overlap)."""
    rng = np.random.default_rng(0)
    mask = compute_span_mask(1000, [1000] * 64, 0.65, 10, rng, require_same_masks=False)
    expected = expected_masked_fraction(0.65, 10)
    assert abs(expected - 0.489) < 1e-3
    assert abs(mask.mean() - expected) < 0.02, mask.mean()


def test_negatives_are_uniform_over_other_masked_frames():
    mask = np.zeros((1, 50), bool)
    mask[0, [3, 10, 20, 30, 40]] = True
    negs = sample_negatives(mask, 20000, np.random.default_rng(0))
    counts = np.bincount(negs[0, 3], minlength=50)
    assert counts[3] == 0 and set(np.flatnonzero(counts)) == {10, 20, 30, 40}
    assert np.abs(counts[[10, 20, 30, 40]] / 20000 - 0.25).max() < 0.015


def test_edge_cases_and_errors():
    # one masked frame: no distractor exists; the row points at itself (the loss drops it)
    mask = np.zeros((1, 5), bool)
    mask[0, 2] = True
    assert (sample_negatives(mask, 4, np.random.default_rng(0))[0, 2] == 2).all()
    # very short utterance: spans are shrunk / clipped, never beyond the length
    short = compute_span_mask(40, [12, 40], 0.65, 10, np.random.default_rng(0), min_masks=2)
    assert not short[0, 12:].any() and short[0].sum() >= 1
    with pytest.raises(ValueError, match="every length"):
        compute_span_mask(10, [11], 0.65, 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="mask_length"):
        compute_span_mask(10, [10], 0.65, 0, np.random.default_rng(0))
