"""Length buckets and the global batch plan: which records form global batch i, padded to what.

Everything here works on record indices and the lengths file, never on audio, and is a pure
function of (stream, lengths, seed, batch index). Every host computes the same plan and reads only
its rows, so all hosts pad step i to the same bucket (`jax.make_array_from_process_local_data`
needs equal shapes) and resuming at batch i reproduces batch i exactly.

The stream is cut into windows of `window_batches * global_batch` consecutive records. Inside a
window, records are grouped by bucket (keeping stream order), buckets are filled shortest first,
and the leftover (< one global batch) of a bucket moves up into the next longer bucket, where it
fits. A window holds a whole number of global batches, so no record is ever dropped: a window
that straddles an epoch boundary simply holds the end of one epoch and the start of the next.
The order of the batches inside a window is a seeded shuffle.

Audio-budget batches (fairseq's `max_tokens`): with `batch_sizes`, a batch from bucket b has
`batch_sizes[b]` rows, the most that keep rows x bucket length within a samples budget, so the
audio per update is nearly constant while shapes stay static (one program per bucket). A window
is then a fixed number of stream records and yields a fixed number of batches (the count expected
from the stream's bucket distribution), so batch i still maps to window i // n without planning
the windows before it. Where a window's records make more batches than that, the surplus batches
(chosen at random) are not trained on this time round; where fewer, and for the longest bucket's
partial batch, rows are filled with other records of the same window. Both are a few batches
per window: `tests/test_batching_budget.py` holds records skipped and records repeated under 2 %.
"""

from __future__ import annotations

import sys
import threading

import grain
import numpy as np

from data_pipelines.errors import UserError
from data_pipelines.sampling import EpochShuffle


def bucket_lengths(lengths: np.ndarray, num_buckets: int, multiple: int = 320) -> np.ndarray:
    """Padded length of each bucket, ascending: length quantiles rounded up to `multiple`.

    At most `num_buckets` values (equal quantiles merge); the last covers the longest record.
    """
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        raise ValueError("cannot bucket zero lengths")
    if num_buckets < 1 or multiple < 1:
        raise ValueError(f"num_buckets and multiple must be >= 1, got {num_buckets}, {multiple}")
    qs = np.quantile(lengths, np.arange(1, num_buckets + 1) / num_buckets, method="higher")
    return np.unique(-(-qs.astype(np.int64) // multiple) * multiple)


def crop_bucket_lengths(lengths: np.ndarray, num_buckets: int, multiple: int = 320) -> np.ndarray:
    """Crop length of each bucket, ascending, for batches cropped to their bucket (no padding):
    lower length quantiles rounded down to `multiple`, the first at the shortest record."""
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        raise ValueError("cannot bucket zero lengths")
    if num_buckets < 1 or multiple < 1:
        raise ValueError(f"num_buckets and multiple must be >= 1, got {num_buckets}, {multiple}")
    qs = np.quantile(lengths, np.arange(num_buckets) / num_buckets, method="lower")
    edges = np.unique(qs.astype(np.int64) // multiple * multiple)
    if edges[0] < multiple:
        raise UserError(f"records shorter than {multiple} samples cannot be cropped to a bucket")
    return edges


def assign_buckets(lengths: np.ndarray, buckets: np.ndarray, crop: bool = False) -> np.ndarray:
    """Index of the shortest bucket that holds each length (with `crop`, of the longest bucket the
    length covers: the record is cropped to it)."""
    if crop:
        ids = np.searchsorted(buckets, lengths, side="right") - 1
        if (ids < 0).any():
            raise UserError(f"a length is shorter than the shortest crop bucket {buckets[0]}")
        return ids
    ids = np.searchsorted(buckets, lengths, side="left")
    if (ids >= len(buckets)).any():
        raise UserError(f"a length exceeds the longest bucket {buckets[-1]}")
    return ids


def plan_window(bucket_ids: np.ndarray, num_buckets: int, global_batch: int, rng: np.random.Generator):
    """(batches [W / global_batch, global_batch] offsets into the window, bucket of each batch).

    `len(bucket_ids)` must be a multiple of `global_batch`; every offset appears exactly once.
    """
    if len(bucket_ids) % global_batch:
        raise ValueError(f"window of {len(bucket_ids)} records is not a multiple of {global_batch}")
    rows, row_buckets = [], []
    carry = np.zeros(0, dtype=np.int64)
    for b in range(num_buckets):
        members = np.concatenate([carry, np.flatnonzero(bucket_ids == b)])
        full = len(members) // global_batch * global_batch
        rows.append(members[:full].reshape(-1, global_batch))
        row_buckets.append(np.full(full // global_batch, b, dtype=np.int64))
        carry = members[full:]  # shorter than bucket b + 1: padded there instead of dropped
    assert len(carry) == 0
    batches, buckets = np.concatenate(rows), np.concatenate(row_buckets)
    order = rng.permutation(len(batches))
    return batches[order], buckets[order]


def budget_batch_sizes(buckets: np.ndarray, samples_per_batch: int, multiple: int = 1) -> np.ndarray:
    """Rows of a global batch per bucket: the largest multiple of `multiple` with rows x length <= budget."""
    buckets = np.asarray(buckets, dtype=np.int64)
    rows = samples_per_batch // buckets // multiple * multiple
    if (rows < multiple).any():
        need = int(buckets[-1]) * multiple
        raise UserError(f"a samples budget of {samples_per_batch} per batch holds no {multiple} rows of the longest "
                         f"bucket ({int(buckets[-1])} samples): it must be at least {need}")
    return rows


def expected_budget_batches(bucket_probs: np.ndarray, batch_sizes: np.ndarray, window_records: int) -> int:
    """Batches `plan_budget_window` makes from `window_records` records with the expected bucket counts."""
    carry, count = 0.0, 0
    for p, rows in zip(bucket_probs, batch_sizes):
        members = carry + window_records * float(p)
        full = int(members // rows)
        count += full
        carry = members - full * rows
    return max(1, count + (carry >= 1.0))


def plan_budget_window(bucket_ids: np.ndarray, batch_sizes: np.ndarray, num_batches: int,
                       rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """(`num_batches` batches of window offsets, bucket of each batch) with `batch_sizes[b]` rows in bucket b.

    Buckets fill shortest first and a bucket's leftover moves up, as in `plan_window`; the longest
    bucket's leftover is completed with other records of the window. The batches are shuffled, then
    cut or topped up (with batches of random window records in the longest bucket) to `num_batches`.
    """
    n = len(bucket_ids)
    batches, buckets = [], []
    carry = np.zeros(0, dtype=np.int64)
    last = len(batch_sizes) - 1
    for b, rows in enumerate(batch_sizes):
        members = np.concatenate([carry, np.flatnonzero(bucket_ids == b)])
        full = len(members) // rows * rows
        batches.extend(members[:full].reshape(-1, rows))
        buckets.extend([b] * (full // rows))
        carry = members[full:]
    rows = int(batch_sizes[last])
    if len(carry):
        others = np.setdiff1d(np.arange(n), carry)
        fill = rng.choice(others, rows - len(carry), replace=len(others) < rows - len(carry))
        batches.append(np.concatenate([carry, fill]))
        buckets.append(last)
    while len(batches) < num_batches:
        batches.append(rng.choice(n, rows, replace=n < rows))
        buckets.append(last)
    order = rng.permutation(len(batches))[:num_batches]
    return [batches[i] for i in order], np.asarray(buckets, dtype=np.int64)[order]


class BatchPlan:
    """Global batch i -> (stream positions, record indices, padded length); thread-safe, picklable."""

    def __init__(
        self,
        stream: grain.MapDataset | EpochShuffle,
        effective_lengths: np.ndarray,
        buckets: np.ndarray,
        global_batch: int,
        window_batches: int,
        seed: int,
        epoch_records: int,
        batch_sizes: np.ndarray | None = None,
        bucket_probs: np.ndarray | None = None,
        crop_to_bucket: bool = False,
    ):
        """`effective_lengths[r]`: samples record r has after cropping; `epoch_records`: records per epoch.

        Audio-budget batches: `batch_sizes[b]` global rows in bucket b (`budget_batch_sizes`) and
        `bucket_probs[b]`, the share of the stream's records in bucket b; `global_batch` is then the
        largest batch and the stream must be infinite.

        `crop_to_bucket`: `buckets` are crop lengths (`crop_bucket_lengths`) and a record joins the
        longest bucket it covers; buckets fill longest first and leftovers move down, so every row
        of a batch is at least its bucket's length and the batch needs no padding.
        """
        if batch_sizes is not None:
            if bucket_probs is None or len(batch_sizes) != len(buckets) or len(bucket_probs) != len(buckets):
                raise ValueError("audio-budget batches need one batch size and one probability per bucket")
            if len(stream) < sys.maxsize:
                raise ValueError("audio-budget batches need an infinite record stream (num_epochs=None)")
            global_batch = int(np.max(batch_sizes))
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        if epoch_records < global_batch:
            raise ValueError(
                f"only {epoch_records} usable records per epoch, "
                f"fewer than one global batch of {global_batch}"
            )
        self.stream = stream
        self.effective_lengths = np.asarray(effective_lengths, dtype=np.int64)
        self.buckets = np.asarray(buckets, dtype=np.int64)
        self.global_batch = global_batch
        # About one epoch per window when the split is small, bounded so a window stays cheap to plan.
        self.window_batches = max(1, min(window_batches, epoch_records // global_batch))
        self.crop_to_bucket = crop_to_bucket
        self.seed = seed
        self.num_batches = sys.maxsize if len(stream) >= sys.maxsize else len(stream) // global_batch
        self.batch_sizes = None if batch_sizes is None else np.asarray(batch_sizes, dtype=np.int64)
        if self.batch_sizes is not None:
            probs = np.asarray(bucket_probs, dtype=np.float64) / np.sum(bucket_probs)
            per_record = float(np.sum(probs / self.batch_sizes))  # batches per record
            self.window_records = int(min(max(window_batches / per_record, global_batch), epoch_records))
            order = slice(None, None, -1) if crop_to_bucket else slice(None)  # the order buckets fill in
            self.window_batches = expected_budget_batches(probs[order], self.batch_sizes[order], self.window_records)
        else:
            self.window_records = self.window_batches * global_batch
        self._lock = threading.Lock()
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"], state["_cache"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._cache = {}

    def _window(self, k: int):
        """(records in stream order, batches as window offsets, bucket ids) of window k."""
        with self._lock:
            if k in self._cache:
                return self._cache[k]
            start = k * self.window_records
            stop = start + self.window_records
            if self.batch_sizes is None:
                stop = min(stop, self.num_batches * self.global_batch)
            take = getattr(self.stream, "take", None)
            if take is not None:
                recs = take(start, stop)
            else:
                recs = np.fromiter(
                    (self.stream[i] for i in range(start, stop)), dtype=np.int64, count=stop - start
                )
            ids = assign_buckets(self.effective_lengths[recs], self.buckets, crop=self.crop_to_bucket)
            sizes, last = self.batch_sizes, len(self.buckets) - 1
            if self.crop_to_bucket:  # plan in reverse bucket order: fill longest first, leftovers move down
                ids, sizes = last - ids, None if sizes is None else sizes[::-1]
            rng = np.random.default_rng([self.seed, 2, k])
            if sizes is None:
                batches, batch_buckets = plan_window(ids, len(self.buckets), self.global_batch, rng)
            else:
                batches, batch_buckets = plan_budget_window(ids, sizes, self.window_batches, rng)
            if self.crop_to_bucket:
                batch_buckets = last - batch_buckets
            if len(self._cache) >= 2:  # consumers move forward: keep the current and the next window
                self._cache.pop(min(self._cache))
            self._cache[k] = (recs, batches, batch_buckets)
            return self._cache[k]

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(stream positions [G], record indices [G], padded length) of global batch `index` (G rows:
        `global_batch`, or with audio-budget batches the bucket's batch size)."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} outside [0, {self.num_batches})")
        k, j = divmod(index, self.window_batches)
        recs, batches, batch_buckets = self._window(k)
        offsets = batches[j]
        positions = k * self.window_records + offsets
        return positions, recs[offsets], int(self.buckets[batch_buckets[j]])


class EvalPlan:
    """Every record once, in length order, cut into global batches: batch i -> (positions, records, padded length).

    Sorting by length keeps padding small; each batch is padded to the smallest bucket that holds
    its longest record. The last batch is completed with copies of its first record, which
    `valid(i)` marks False so that no score counts them twice.
    """

    def __init__(self, lengths: np.ndarray, buckets: np.ndarray, global_batch: int):
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.buckets = np.asarray(buckets, dtype=np.int64)
        self.global_batch = global_batch
        self.order = np.argsort(self.lengths, kind="stable")
        self.num_records = len(self.order)
        self.num_batches = -(-self.num_records // global_batch)

    def _slots(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} outside [0, {self.num_batches})")
        slots = np.arange(index * self.global_batch, (index + 1) * self.global_batch)
        return np.where(slots < self.num_records, slots, index * self.global_batch)

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(positions in length order [G], record indices [G], padded length) of global batch `index`."""
        slots = self._slots(index)
        recs = self.order[slots]
        longest = int(self.lengths[recs].max())
        return slots, recs, int(self.buckets[assign_buckets(np.asarray([longest]), self.buckets)[0]])

    def valid(self, index: int) -> np.ndarray:
        """[G] bool: False on the rows that repeat a record to fill the last batch."""
        return np.arange(index * self.global_batch, (index + 1) * self.global_batch) < self.num_records
