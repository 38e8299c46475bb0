"""Record streams: the global order in which a split's records are consumed.

A stream is an (optionally infinite) random-access sequence of record indices, identical on every
host; `batching.BatchPlan` cuts it into global batches and each host reads only its rows.

- `shuffled_stream`: a new seeded permutation every epoch (`EpochShuffle`).
- `mixed_stream`: XLS-R's multilingual sampling. Each language is its own shuffled, endlessly
  repeated source; grain's `MapDataset.mix` interleaves them with weights p_l proportional to
  (n_l / N)^alpha. alpha=1 keeps the natural proportions, alpha=0 is uniform over languages, and
  XLS-R used alpha=0.5 to upsample low-resource languages. n_l counts records, or with
  `lengths` the language's audio (XLS-R counts hours): p_l is then each language's share of the
  *audio* drawn, and records are mixed with weights p_l / (mean record length of l), since clip
  lengths differ several-fold between corpora.
"""

from __future__ import annotations

import sys

import grain
import numpy as np

from data_pipelines.errors import UserError

# grain's mix is a deterministic interleave with integer weights: it scales the smallest weight to
# 100 and truncates the others, so each integer weight is within 1% of its exact value and, after
# renormalizing, each realized proportion within 2% (relative) of its target over any span of
# sum(integer weights) records. Each language's own order is a fresh shuffle per epoch.
MIX_RELATIVE_TOLERANCE = 0.02


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from several integers (grain seeds must fit in uint32)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def language_weights(counts: np.ndarray | list[float], alpha: float = 0.5) -> np.ndarray:
    """Sampling probabilities p_l proportional to (n_l / N)^alpha; languages with n_l = 0 get 0."""
    counts = np.asarray(counts, dtype=np.float64)
    if (counts < 0).any() or counts.sum() <= 0:
        raise UserError(f"language counts must be non-negative with a positive sum, got {counts.tolist()}")
    if alpha < 0:
        raise UserError(f"alpha must be >= 0, got {alpha}")
    q = counts / counts.sum()
    w = np.where(q > 0, q**alpha, 0.0)
    return w / w.sum()


class EpochShuffle:
    """Random-access source: element i is records[perm_e[i mod n]], a fresh permutation per epoch e.

    Used instead of grain's `MapDataset.shuffle`, whose index shuffle costs ~1.5 ms per element on
    a 15-record domain (~10 us at 5,000, ~3 us at 100,000): low-resource languages are small.
    """

    def __init__(self, records: np.ndarray, seed: int, num_epochs: int | None = None):
        self.records = np.asarray(records, dtype=np.int64)
        if len(self.records) == 0:
            raise UserError("cannot shuffle zero records")
        self.seed = seed
        self.length = sys.maxsize if num_epochs is None else num_epochs * len(self.records)
        self._perm: tuple[int, np.ndarray] = (-1, self.records)

    def __len__(self) -> int:
        return self.length

    def _epoch(self, epoch: int) -> np.ndarray:
        cached_epoch, perm = self._perm  # one tuple read: safe against a concurrent refill
        if cached_epoch != epoch:
            perm = self.records[np.random.default_rng([self.seed, epoch]).permutation(len(self.records))]
            self._perm = (epoch, perm)
        return perm

    def __getitem__(self, index: int) -> int:
        epoch, i = divmod(int(index), len(self.records))
        return int(self._epoch(epoch)[i])

    def take(self, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) at once (what `batching.BatchPlan` reads per window)."""
        n, out, pos = len(self.records), np.empty(stop - start, np.int64), start
        while pos < stop:
            epoch, i = divmod(pos, n)
            end = min(stop, (epoch + 1) * n)
            out[pos - start : end - start] = self._epoch(epoch)[i : i + end - pos]
            pos = end
        return out

    def __getstate__(self):
        return {**self.__dict__, "_perm": (-1, self.records)}


def shuffled_stream(records: np.ndarray, seed: int, num_epochs: int | None = None) -> EpochShuffle:
    """`records` in a new seeded order every epoch; infinite when `num_epochs` is None."""
    return EpochShuffle(records, derived_seed(seed, 0), num_epochs)


def mixed_stream(
    records: np.ndarray,
    language_ids: np.ndarray,
    seed: int,
    alpha: float = 0.5,
    weights: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
    trained_lengths: np.ndarray | None = None,
) -> tuple[grain.MapDataset, np.ndarray]:
    """(infinite stream over `records` mixing languages by temperature, per-language record weights).

    `language_ids[i]` is the language of `records[i]`. Returns the probability that a drawn record
    is of each language, indexed by language id (zero for languages absent from `records`). Pass
    `weights` to override the temperature rule. With `lengths[i]` (samples of `records[i]`), the
    rule weighs languages by audio, and `weights` or (n_l / N)^alpha are target shares of the audio
    drawn, measured in `trained_lengths` (what a record contributes after cropping; default `lengths`).
    """
    records = np.asarray(records, dtype=np.int64)
    language_ids = np.asarray(language_ids)
    if records.shape != language_ids.shape:
        raise ValueError(f"records {records.shape} and language_ids {language_ids.shape} differ in shape")
    num_languages = int(language_ids.max()) + 1 if len(language_ids) else 0
    counts = np.bincount(language_ids, minlength=num_languages)
    amounts = counts if lengths is None else np.bincount(language_ids, weights=lengths, minlength=num_languages)
    target = language_weights(amounts, alpha) if weights is None else np.asarray(weights, np.float64)
    if target.shape != counts.shape:
        raise ValueError(f"weights must have one entry per language id ({len(counts)}), got {target.shape}")
    if lengths is not None:  # audio shares -> record weights: divide by each language's mean trained length
        trained = lengths if trained_lengths is None else trained_lengths
        audio = np.bincount(language_ids, weights=trained, minlength=num_languages)
        mean = np.divide(audio, counts, out=np.ones(num_languages), where=counts > 0)
        target = np.where(counts > 0, target / mean, 0.0)
    present = [lang for lang in range(num_languages) if counts[lang] > 0 and target[lang] > 0]
    if not present:
        raise UserError("no language has both records and a positive weight")
    parts = [
        grain.MapDataset.source(EpochShuffle(records[language_ids == lang], derived_seed(seed, 1, lang)))
        for lang in present
    ]
    mixed = grain.MapDataset.mix(parts, weights=[float(target[lang]) for lang in present])
    return mixed, target / target.sum()
