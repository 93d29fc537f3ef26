"""How preprocessing splits the rows: a seeded 64-bit hash per row, exact split sizes from a key
histogram (`SplitRatings`), the newest rows (temporal) or each user's newest K (`LastKSplit`).

Deterministic whatever the runner, the chunking or the file order.
"""

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from components import features as F
from components.preprocessing.vocabularies import VocabularyCountsFn

BUCKET_BITS = 16  # histogram resolution of the exact-count split


KEY_BITS = 64


RECENCY_HASH_BITS = 22


SPLIT_RANDOM, SPLIT_TEMPORAL, SPLIT_LAST_K = "random", "temporal", "last-k"


SPLIT_MODES = (SPLIT_RANDOM, SPLIT_TEMPORAL, SPLIT_LAST_K)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed 64-bit hash step (wrapping uint64 arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def id_hashes(ids: np.ndarray) -> np.ndarray:
    """int64 ids as they are; string ids as a stable 64-bit hash of their UTF-8 bytes (hashed
    once per distinct id of the chunk)."""
    if ids.dtype != object:
        return np.asarray(ids).astype(np.int64)
    distinct, inverse = np.unique(ids, return_inverse=True)
    digests = b"".join(
        hashlib.blake2b(str(token).encode(), digest_size=8).digest() for token in distinct
    )
    return np.frombuffer(digests, dtype="<i8")[inverse.reshape(-1)]


def split_keys(
    users: np.ndarray, movies: np.ndarray, timestamps: np.ndarray, seed: int
) -> np.ndarray:
    """A 64-bit pseudo-random key per rating, stable across runs, runners and chunkings."""
    with np.errstate(over="ignore"):
        key = _mix(np.full(len(users), seed & (2**64 - 1), dtype=np.uint64))
        for column in (users, movies, timestamps):
            key = _mix(key ^ id_hashes(np.asarray(column)).view(np.uint64))
    return key


def recency_keys(timestamps: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Keys that order rows by time (ties broken by the seeded hash): timestamps up to 2**42
    (seconds or milliseconds since 1970) in the high bits, 22 bits of hash below."""
    times = np.clip(np.asarray(timestamps, dtype=np.int64), 0, (1 << 42) - 1).astype(np.uint64)
    return (times << np.uint64(RECENCY_HASH_BITS)) | (keys >> np.uint64(64 - RECENCY_HASH_BITS))


def find_cuts(histogram: np.ndarray, counts: list[int]) -> list[tuple[int, int]]:
    """For each rank in `counts` (cumulative row counts), the (bucket, rank inside the bucket,
    1-based) of the key with that rank; (-1, 0) for rank 0 (nothing below the cut)."""
    cumulative = np.cumsum(histogram)
    cuts = []
    for rank in counts:
        if rank <= 0:
            cuts.append((-1, 0))
            continue
        bucket = int(np.searchsorted(cumulative, rank))
        below = int(cumulative[bucket - 1]) if bucket else 0
        cuts.append((bucket, rank - below))
    return cuts


def split_sizes(total: int, test_fraction: float, validation_fraction: float) -> dict[str, int]:
    n_test = int(round(total * test_fraction))
    n_validation = int(round((total - n_test) * validation_fraction))
    return {
        F.TEST_SPLIT: n_test,
        F.VALIDATION_SPLIT: n_validation,
        F.TRAIN_SPLIT: total - n_test - n_validation,
    }


def assign_splits(keys: np.ndarray, thresholds: tuple) -> np.ndarray:
    """0 = test, 1 = validation, 2 = train: keys up to each threshold (inclusive; None = no row
    below that cut)."""
    test_cut, validation_cut = thresholds
    out = np.full(len(keys), 2, dtype=np.int8)
    if validation_cut is not None:
        out[keys <= np.uint64(validation_cut)] = 1
    if test_cut is not None:
        out[keys <= np.uint64(test_cut)] = 0
    return out


SPLIT_ORDER = (F.TEST_SPLIT, F.VALIDATION_SPLIT, F.TRAIN_SPLIT)  # the codes of assign_splits


class SumArrays(beam.CombineFn):
    """Element-wise sum of equally shaped integer arrays (a histogram, per-split counts)."""

    def __init__(self, size: int):
        super().__init__()
        self._size = size

    def create_accumulator(self) -> np.ndarray:
        return np.zeros(self._size, dtype=np.int64)

    def add_input(self, acc: np.ndarray, values: np.ndarray) -> np.ndarray:
        acc += values
        return acc

    def merge_accumulators(self, accs: Iterable[np.ndarray]) -> np.ndarray:
        return np.sum(list(accs), axis=0, dtype=np.int64)

    def extract_output(self, acc: np.ndarray) -> np.ndarray:
        return acc


def _bucket_counts(chunk: dict[str, np.ndarray]) -> np.ndarray:
    buckets = (chunk["keys"] >> np.uint64(KEY_BITS - BUCKET_BITS)).astype(np.int64)
    return np.bincount(buckets, minlength=1 << BUCKET_BITS)


class SplitRatings(beam.PTransform):
    """Exact split sizes chosen by the smallest seeded keys, and the training split's id counts,
    from two reads of the data (`{"first": chunks, "second": chunks}`), never holding the rows.

    The first read builds a 65,536-bucket histogram of the keys: it tells the buckets holding the
    two cuts. The second collects the keys of those two buckets (a few rows) to place the cuts
    exactly, and counts the ids of the rows sure to be train (above the validation cut's bucket);
    the rows of that bucket are settled once the cut is known. Outputs `thresholds` (for
    `assign_splits`) and `train_counts` (for the vocabularies), both singletons.
    """

    def __init__(self, test_fraction: float, validation_fraction: float):
        super().__init__()
        self._fractions = (test_fraction, validation_fraction)

    def expand(self, reads):
        test_fraction, validation_fraction = self._fractions
        histogram = (
            reads["first"]
            | "Buckets" >> beam.Map(_bucket_counts)
            | "Histogram" >> beam.CombineGlobally(SumArrays(1 << BUCKET_BITS))
        )

        def cuts_of(hist: np.ndarray) -> list[tuple[int, int]]:
            sizes = split_sizes(int(hist.sum()), test_fraction, validation_fraction)
            return find_cuts(
                hist, [sizes[F.TEST_SPLIT], sizes[F.TEST_SPLIT] + sizes[F.VALIDATION_SPLIT]]
            )

        cuts = beam.pvalue.AsSingleton(histogram | "FindBuckets" >> beam.Map(cuts_of))
        shift = np.uint64(KEY_BITS - BUCKET_BITS)

        def boundary_rows(chunk, cuts):
            """The rows of the cut buckets (keys, users, movies): a few per chunk. Keys ride
            in uint64 arrays: above 2**63 they do not fit Beam's integer coder."""
            wanted = [np.uint64(bucket) for bucket, _ in cuts if bucket >= 0]
            rows = np.isin(chunk["keys"] >> shift, wanted)
            if rows.any():
                yield {name: chunk[name][rows] for name in ("keys", "users", "movies")}

        def thresholds_of(parts: list[dict], cuts) -> tuple:
            keys = (
                np.sort(np.concatenate([p["keys"] for p in parts]))
                if parts
                else np.zeros(0, np.uint64)
            )
            out = []
            for bucket, rank in cuts:
                if bucket < 0:
                    out.append(None)
                    continue
                in_bucket = keys[(keys >> shift) == np.uint64(bucket)]
                out.append(in_bucket[rank - 1])
            return tuple(out)

        def surely_train(chunk, cuts):
            bucket = cuts[1][0]  # the validation cut's (-1: no row below it, all are train)
            if bucket < 0:
                return chunk
            return _rows(chunk, (chunk["keys"] >> shift) > np.uint64(bucket))

        cut_rows = (
            reads["second"]
            | "CutBucketRows" >> beam.FlatMap(boundary_rows, cuts)
            | "CollectCutRows" >> beam.combiners.ToList()
        )
        thresholds = cut_rows | "Thresholds" >> beam.Map(thresholds_of, cuts)
        counts = (
            reads["second"]
            | "SurelyTrain" >> beam.Map(surely_train, cuts)
            | "CountSurelyTrain" >> beam.CombineGlobally(VocabularyCountsFn())
        )

        def add_boundary_train(counts, parts: list[dict], thresholds):
            counts = (Counter(counts[0]), Counter(counts[1]))  # side values are not ours to change
            if parts:
                rows = {
                    n: np.concatenate([p[n] for p in parts]) for n in ("keys", "users", "movies")
                }
                train = assign_splits(rows["keys"], thresholds) == 2
                VocabularyCountsFn().add_input(counts, _rows(rows, train))
            return counts

        train_counts = counts | "CountBoundaryTrain" >> beam.Map(
            add_boundary_train,
            beam.pvalue.AsSingleton(cut_rows),
            beam.pvalue.AsSingleton(thresholds),
        )
        return {"thresholds": thresholds, "train_counts": train_counts}


def _rows(chunk: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[rows] for name, values in chunk.items()}


class _TopKeysFn(beam.CombineFn):
    """The k largest recency keys (one user's k newest ratings)."""

    def __init__(self, k: int):
        super().__init__()
        self._k = k

    def create_accumulator(self) -> np.ndarray:
        return np.zeros(0, dtype=np.uint64)

    def add_input(self, acc: np.ndarray, keys: np.ndarray) -> np.ndarray:
        return np.sort(np.concatenate([acc, keys]))[-self._k :]

    def merge_accumulators(self, accs: Iterable[np.ndarray]) -> np.ndarray:
        return np.sort(np.concatenate(list(accs)))[-self._k :]

    def extract_output(self, acc: np.ndarray) -> np.ndarray:
        return acc


def newest_per_user(chunk: dict[str, np.ndarray], k: int) -> Iterator[tuple[Any, np.ndarray]]:
    """(user, up to k newest recency keys of that user in this chunk)."""
    order = np.lexsort((chunk["recency"], id_hashes(chunk["users"])))
    users, recency = chunk["users"][order], chunk["recency"][order]
    ends = np.r_[np.flatnonzero(users[1:] != users[:-1]), len(users) - 1] + 1
    starts = np.r_[0, ends[:-1]]
    for start, end in zip(starts, ends, strict=True):
        yield (
            users[start].item() if users.dtype != object else users[start],
            recency[max(start, end - k) : end],
        )


def last_k_codes(
    chunk: dict[str, np.ndarray], limits: dict, validation_fraction: float
) -> np.ndarray:
    """Split codes (as `assign_splits`) of a chunk under last-k: a user's k newest ratings
    (recency >= the user's k-th newest) are test; a seeded share of the rest is validation."""
    cut = np.uint64(min(int(validation_fraction * 2.0**64), 2**64 - 1))
    users = chunk["users"].tolist()
    kth = np.array([limits[u] for u in users], dtype=np.uint64)
    return np.where(chunk["recency"] >= kth, 0, np.where(chunk["keys"] < cut, 1, 2)).astype(np.int8)


class LastKSplit(beam.PTransform):
    """Each user's k newest ratings are the test split; the validation split is a seeded
    `validation_fraction` of the rest (by hash, not exact). From two reads, as `SplitRatings`:
    `thresholds` is a PCollection of (user, k-th newest recency key) pairs (a dict side input
    for `last_k_codes`), `train_counts` the training split's id counts."""

    def __init__(self, k: int, validation_fraction: float):
        super().__init__()
        self._k = k
        self._validation = validation_fraction

    def expand(self, reads):
        k, fraction = self._k, self._validation
        thresholds = (
            reads["first"]
            | "NewestPerUser" >> beam.FlatMap(newest_per_user, k)
            | "TopKPerUser" >> beam.CombinePerKey(_TopKeysFn(k))
            | "KthNewest" >> beam.MapTuple(lambda user, keys: (user, keys.min()))
        )

        def train_rows(chunk, limits):
            return _rows(chunk, last_k_codes(chunk, limits, fraction) == 2)

        train_counts = (
            reads["second"]
            | "TrainRows" >> beam.Map(train_rows, beam.pvalue.AsDict(thresholds))
            | "CountTrain" >> beam.CombineGlobally(VocabularyCountsFn())
        )
        return {"thresholds": thresholds, "train_counts": train_counts}
