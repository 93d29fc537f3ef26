"""Stage 2, preprocessing (Apache Beam): parse, normalise, split, build vocabularies, write
TFRecords.

Rows travel in chunks (numpy columns of a block of ~1 MB of lines), never one element per row:
the per-element cost of a Beam runner, not the parsing, is what made this stage slow. A block is
checked and converted at once (`ingestion.parse_block`); a block holding a malformed line is
parsed line by line, and each malformed line goes to a dead-letter output (file, line number,
reason) instead of being dropped. Valid rows are normalised over the data's rating range and
split by a seeded 64-bit hash of (user, movie, timestamp): the `round(N * test_fraction)`
smallest keys form the test split, the next `round((N - test) * validation_fraction)` the
validation split (carved from train), the rest train -- deterministic whatever the runner, the
chunking or the file order. User and movie vocabularies are counted on the training split;
Examples hold vocabulary indices. Outputs: `tf.train.Example` TFRecords per split,
`vocabulary/`, `stats.json`.

The data is read three times, each read fused with its consumers (the key histogram; the rows at
the split cuts and the training split's id counts; assignment, indexing and writing), so no
PCollection of rows is ever materialised: memory is bounded by the vocabularies, not the rows.
Runs on DirectRunner here; the same transforms run on Dataflow/Flink/Spark: standard Beam
pipeline options pass straight through (`mtrec preprocess --beam-args ...`).
"""

import hashlib
import json
import logging
import os
import shutil
import struct
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import google_crc32c
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from components import features as F
from components import progress
from components.artifacts.examples import TFRECORD_SUFFIX, encode_examples, load_stats
from components.artifacts.ratings import read_report
from components.artifacts.vocabulary import (
    INT64,
    MOVIES_FILE,
    USERS_FILE,
    VOCABULARY_DIR,
    Vocabularies,
    Vocabulary,
    id_array,
)
from components.config import PreprocessingConfig
from components.errors import MAX_REPORTED_PROBLEMS, DataError
from components.ingestion.layouts import LAYOUTS, ML_100K, Layout
from components.ingestion.parsing import (
    BadRow,
    numbered_lines,
    parse_block,
    parse_rating_line,
    read_line_blocks,
)
from components.storage import PARTIAL_SUFFIX, atomic_output_dir

log = logging.getLogger(__name__)

TEMP_DIR = ".writing"  # the shard writers' files before they are renamed into shards
BUCKET_BITS = 16  # histogram resolution of the exact-count split
KEY_BITS = 64
DEAD_LETTER_TAG = "dead_letter"
_COLUMNS = ("users", "movies", "stars", "timestamps", "keys")
RECENCY_HASH_BITS = 22
SPLIT_RANDOM, SPLIT_TEMPORAL, SPLIT_LAST_K = "random", "temporal", "last-k"
SPLIT_MODES = (SPLIT_RANDOM, SPLIT_TEMPORAL, SPLIT_LAST_K)


# --- pure helpers ---


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


def encode_rows(
    chunk: dict[str, np.ndarray],
    rows: np.ndarray,
    stars_range: tuple[float, float] = F.DEFAULT_STARS_RANGE,
) -> list[bytes]:
    """tf.train.Example bytes of the selected rows of a chunk (ids already vocabulary
    indices), encoded together (`examples.encode_examples`)."""
    stars = chunk["stars"][rows]
    return encode_examples(
        {
            F.USER_ID: chunk["users"][rows],
            F.MOVIE_ID: chunk["movies"][rows],
            F.RATING: F.normalise_stars(stars, stars_range),
            F.STARS: stars,
            F.TIMESTAMP: chunk["timestamps"][rows],
        }
    )


# --- Beam transforms ---


def read_blocks(path: str, source: str) -> Iterator[tuple[str, int, bytes]]:
    """(source, number of the block's first line, whole lines as bytes) blocks of a file, so
    dead letters point at the original line."""
    for first, data in read_line_blocks(path):
        yield source, first, data


@dataclass(frozen=True)
class ParseSettings:
    """How to read the ingested lines: the split keys' seed and kind, the release's layout, and
    the lines the duplicate rule drops (from ingestion.json)."""

    seed: int
    split: str = SPLIT_RANDOM
    layout: Layout = ML_100K
    superseded: frozenset[int] = frozenset()
    id_kinds: tuple[tuple[str, str], ...] = (("user", INT64), ("movie", INT64))


class _ParseChunkFn(beam.DoFn):
    """A block of lines -> one dict of numpy columns (valid rows) + dead letters (BadRow).

    Fast path: the whole block checked and converted at once (`ingestion.parse_block`); a block
    with any bad or blank line is parsed line by line, so each bad line becomes a dead letter
    naming its line."""

    def __init__(self, settings: ParseSettings):
        super().__init__()
        self._settings = settings

    def setup(self):
        self._superseded = np.array(sorted(self._settings.superseded), dtype=np.int64)

    def process(self, element: tuple[str, int, bytes]) -> Iterable[Any]:
        source, first, data = element
        settings = self._settings
        kinds = dict(settings.id_kinds)
        if settings.layout.header and first == 1:
            newline = data.find(b"\n") + 1 or len(data)
            data, first = data[newline:], 2
        if data and not data.endswith(b"\n"):
            data += b"\n"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None  # the line-by-line path names the line
        chunk = parse_block(text, settings.layout, kinds) if text is not None else None
        if chunk is not None:
            lines = np.arange(first, first + len(chunk["users"]), dtype=np.int64)
            if self._superseded.size:
                keep = ~np.isin(lines, self._superseded)
                chunk = {name: values[keep] for name, values in chunk.items()}
        else:
            chunk = yield from self._parse_lines(source, first, data, kinds)
        if chunk is not None and len(chunk["users"]):
            yield self._with_keys(chunk)

    def _parse_lines(self, source: str, first: int, data: bytes, kinds: dict[str, str]):
        settings = self._settings
        users, movies, stars, times = [], [], [], []
        for number, line in numbered_lines(data, first, source):
            if number in settings.superseded:
                continue  # a duplicate the rule drops (counted by ingestion)
            parsed = parse_rating_line(line, source, number, settings.layout, kinds)
            if isinstance(parsed, BadRow):
                yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, parsed)
                continue
            users.append(parsed.user_id)
            movies.append(parsed.movie_id)
            stars.append(parsed.stars)
            times.append(parsed.timestamp)
        if not users:
            return None
        return {
            "users": id_array(users, kinds["user"]),
            "movies": id_array(movies, kinds["movie"]),
            "stars": np.asarray(stars, dtype=np.float64),
            "timestamps": np.asarray(times, dtype=np.int64),
        }

    def _with_keys(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        settings = self._settings
        chunk["keys"] = split_keys(
            chunk["users"], chunk["movies"], chunk["timestamps"], settings.seed
        )
        if settings.split != SPLIT_RANDOM:
            chunk["recency"] = recency_keys(chunk["timestamps"], chunk["keys"])
        if settings.split == SPLIT_TEMPORAL:  # the newest rows get the smallest keys
            chunk["keys"] = ~chunk["recency"]
        return chunk


class ParseRatings(beam.PTransform):
    """(source, first line number, bytes) blocks -> column chunks, plus a `dead_letter`
    output."""

    def __init__(self, settings: ParseSettings):
        super().__init__()
        self._parse = _ParseChunkFn(settings)

    def expand(self, chunks):
        outputs = chunks | "Parse" >> beam.ParDo(self._parse).with_outputs(
            DEAD_LETTER_TAG, main="ratings"
        )
        return {"ratings": outputs.ratings, DEAD_LETTER_TAG: outputs[DEAD_LETTER_TAG]}


class _SumArrays(beam.CombineFn):
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
            | "Histogram" >> beam.CombineGlobally(_SumArrays(1 << BUCKET_BITS))
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
            keys = np.sort(np.concatenate([p["keys"] for p in parts])) if parts else np.zeros(0, np.uint64)
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
            | "CountSurelyTrain" >> beam.CombineGlobally(_VocabularyCountsFn())
        )

        def add_boundary_train(counts, parts: list[dict], thresholds):
            counts = (Counter(counts[0]), Counter(counts[1]))  # side values are not ours to change
            if parts:
                rows = {n: np.concatenate([p[n] for p in parts]) for n in ("keys", "users", "movies")}
                train = assign_splits(rows["keys"], thresholds) == 2
                _VocabularyCountsFn().add_input(counts, _rows(rows, train))
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
        yield users[start].item() if users.dtype != object else users[start], recency[
            max(start, end - k) : end
        ]


def last_k_codes(chunk: dict[str, np.ndarray], limits: dict, validation_fraction: float) -> np.ndarray:
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
            | "CountTrain" >> beam.CombineGlobally(_VocabularyCountsFn())
        )
        return {"thresholds": thresholds, "train_counts": train_counts}


class _IdStatsFn(beam.CombineFn):
    """Distinct users/movies and the largest ids: memory bounded by the vocabularies."""

    def create_accumulator(self):
        return set(), set()

    def add_input(self, acc, chunk):
        acc[0].update(np.unique(chunk["users"]).tolist())
        acc[1].update(np.unique(chunk["movies"]).tolist())
        return acc

    def merge_accumulators(self, accs):
        users, movies = set(), set()
        for u, m in accs:
            users |= u
            movies |= m
        return users, movies

    def extract_output(self, acc):
        users, movies = acc
        return {"users": len(users), "movies": len(movies)}


class _VocabularyCountsFn(beam.CombineFn):
    """Ratings per raw user and movie id of the training split: (Counter, Counter). Each chunk
    is counted with numpy first, so the Python work is per distinct id of a chunk, and the
    accumulators are bounded by the number of distinct ids, not rows."""

    def create_accumulator(self):
        return Counter(), Counter()

    def add_input(self, acc, chunk):
        for counter, column in zip(acc, (chunk["users"], chunk["movies"]), strict=True):
            distinct, counts = np.unique(column, return_counts=True)
            for token, count in zip(distinct.tolist(), counts.tolist(), strict=True):
                counter[token] += count
        return acc

    def merge_accumulators(self, accs):
        users, movies = Counter(), Counter()
        for u, m in accs:
            users.update(u)
            movies.update(m)
        return users, movies

    def extract_output(self, acc):
        return acc


class _BuildVocabularies(beam.DoFn):
    def __init__(self, id_kinds: dict[str, str], min_user_count: int, min_item_count: int):
        super().__init__()
        self._kinds = id_kinds
        self._min_counts = (min_user_count, min_item_count)

    def process(self, counts):
        users, movies = counts
        yield Vocabularies(
            Vocabulary.from_counts(users, self._kinds["user"], self._min_counts[0]),
            Vocabulary.from_counts(movies, self._kinds["movie"], self._min_counts[1]),
        )


def vocabulary_text(vocabulary: Vocabulary) -> str:
    """A vocabulary file's content as one element (WriteToText adds the last newline): one
    element keeps the lines in index order on any runner."""
    return "\n".join(str(token) for token in vocabulary.tokens.tolist())


def apply_vocabularies(chunk: dict[str, np.ndarray], vocab: Vocabularies) -> dict[str, np.ndarray]:
    """A chunk with raw ids replaced by vocabulary indices (0: out of vocabulary)."""
    out = dict(chunk)
    out["users"] = vocab.users.lookup(chunk["users"])
    out["movies"] = vocab.movies.lookup(chunk["movies"])
    return out


def _bad_row_json(bad: BadRow) -> str:
    return json.dumps(
        {"source": bad.source, "line": bad.line_number, "reason": bad.reason, "text": bad.line}
    )


OOV_TAG = "oov"
_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> bytes:
    """TFRecord's masked CRC-32C of a record part."""
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF)


def tfrecord_frames(records: list[bytes]) -> bytes:
    """Records framed as a TFRecord file holds them: length, its CRC, data, the data's CRC.
    Example lengths repeat, so each length header is computed once."""
    headers: dict[int, bytes] = {}
    out = []
    for record in records:
        header = headers.get(len(record))
        if header is None:
            length = struct.pack("<Q", len(record))
            header = headers[len(record)] = length + _masked_crc(length)
        out += (header, record, _masked_crc(record))
    return b"".join(out)


class _WriteExamplesFn(beam.DoFn):
    """Column chunks -> split codes -> TFRecord files of Examples (vocabulary indices): per
    bundle, one file per split.

    A chunk is encoded and written as one piece, so no per-row element crosses Beam (that cost
    ~10 us a row in DirectRunner). Outputs each finished file as (split, temporary path), renamed
    into shards by `_finalize_shards`, and, tagged `oov`, per chunk and split the counts (rows,
    rows of an unknown user, of an unknown movie). Paths go through Beam's FileSystems, so the
    same code writes to gs:// on Dataflow."""

    def __init__(
        self,
        temp_dir: str,
        total_rows: int | None,
        stars_range: tuple[float, float],
        last_k_validation: float | None = None,
    ):
        super().__init__()
        self._temp_dir = temp_dir
        self._total = total_rows
        self._stars_range = stars_range
        self._last_k_validation = last_k_validation  # None: exact thresholds, else last-k

    def setup(self):
        self._reporter = progress.Reporter("rows", self._total)

    def start_bundle(self):
        self._files: dict[str, tuple[str, Any]] = {}

    def process(self, chunk, vocab: Vocabularies, thresholds):
        if self._last_k_validation is None:
            codes = assign_splits(chunk["keys"], thresholds)
        else:
            codes = last_k_codes(chunk, thresholds, self._last_k_validation)
        indexed = apply_vocabularies(chunk, vocab)
        for code, split in enumerate(SPLIT_ORDER):
            rows = np.flatnonzero(codes == code)
            if not rows.size:
                continue
            if split not in self._files:
                path = FileSystems.join(self._temp_dir, f"{split}-{uuid.uuid4().hex}")
                self._files[split] = (path, FileSystems.create(path))
            records = encode_rows(indexed, rows, self._stars_range)
            self._files[split][1].write(tfrecord_frames(records))
            counts = [rows.size, int((indexed["users"][rows] == 0).sum()), int((indexed["movies"][rows] == 0).sum())]
            yield beam.pvalue.TaggedOutput(OOV_TAG, (split, np.array(counts, dtype=np.int64)))
        self._reporter.advance(len(codes))

    def finish_bundle(self):
        for split, (path, handle) in self._files.items():
            handle.close()
            yield beam.utils.windowed_value.WindowedValue(
                (split, path),
                beam.utils.timestamp.MIN_TIMESTAMP,
                [beam.transforms.window.GlobalWindow()],
            )


def _finalize_shards(files: list[tuple[str, str]], out_dir: str, split: str) -> int:
    """Rename a split's temporary files to `<split>-NNNNN-of-MMMMM.tfrecord` (an empty shard
    when the split holds no rows); returns the number of shards."""
    paths = sorted(path for name, path in files if name == split)
    if not paths:
        empty = FileSystems.join(out_dir, f"{split}-00000-of-00001{TFRECORD_SUFFIX}")
        FileSystems.create(empty).close()
        return 1
    targets = [
        FileSystems.join(out_dir, f"{split}-{i:05d}-of-{len(paths):05d}{TFRECORD_SUFFIX}")
        for i in range(len(paths))
    ]
    FileSystems.rename(paths, targets)
    return len(paths)


def build_pipeline(
    pipeline: beam.Pipeline,
    ratings_paths: list[str],
    out_dir: str,
    config: PreprocessingConfig,
    source_names: dict[str, str] | None = None,
    ingestion: dict[str, Any] | None = None,
):
    """Wire the transforms: read -> parse (+dead letter) -> split -> TFRecords + stats.json.
    `ingestion` is ingestion.json's content: layout, rating scale, duplicate lines, row count."""
    names = source_names or {}
    ingestion = ingestion or {}
    layout = LAYOUTS[ingestion.get("layout", ML_100K.name)]
    stars_range = tuple(ingestion.get("stars_range", F.DEFAULT_STARS_RANGE))
    superseded = frozenset(ingestion.get("superseded_lines", ()))
    id_kinds = dict(ingestion.get("id_kinds") or {"user": INT64, "movie": INT64})
    total_rows = (ingestion.get("ratings_rows") or 0) - len(superseded) or None
    settings = ParseSettings(
        config.split_seed, config.split, layout, superseded, tuple(sorted(id_kinds.items()))
    )

    def read(label: str):
        """A fresh read of the ratings. Each pass fuses read -> parse -> its consumers, so no
        PCollection of rows is ever held (DirectRunner keeps in memory every PCollection a
        later stage reads): memory is bounded by the vocabularies, not the rows."""
        return (
            pipeline
            | f"{label}Paths" >> beam.Create(ratings_paths)
            | f"{label}Read" >> beam.FlatMap(lambda path: read_blocks(path, names.get(path, path)))
            | f"{label}Parse" >> ParseRatings(settings)
        )

    first, second, third = read("First"), read("Second"), read("Third")
    reads = {"first": first["ratings"], "second": second["ratings"]}
    if config.split == SPLIT_LAST_K:
        split = reads | "Split" >> LastKSplit(config.last_k, config.validation_fraction)
        thresholds = beam.pvalue.AsDict(split["thresholds"])
        last_k_validation = config.validation_fraction
    else:
        split = reads | "Split" >> SplitRatings(config.test_fraction, config.validation_fraction)
        thresholds = beam.pvalue.AsSingleton(split["thresholds"])
        last_k_validation = None

    # Vocabularies from the training split only (TFX's analyse-on-train), applied to every split.
    vocabularies = split["train_counts"] | "Vocabularies" >> beam.ParDo(
        _BuildVocabularies(id_kinds, config.min_user_count, config.min_item_count)
    )
    for role, attribute, file_name in (
        ("Users", "users", USERS_FILE),
        ("Movies", "movies", MOVIES_FILE),
    ):
        (
            vocabularies
            | f"{role}VocabularyText"
            >> beam.Map(lambda vocab, attribute=attribute: vocabulary_text(getattr(vocab, attribute)))
            | f"Write{role}Vocabulary"
            >> beam.io.WriteToText(
                os.path.join(out_dir, VOCABULARY_DIR, file_name),
                shard_name_template="",
                num_shards=1,
            )
        )

    written = third["ratings"] | "WriteExamples" >> beam.ParDo(
        _WriteExamplesFn(
            FileSystems.join(out_dir, TEMP_DIR), total_rows, stars_range, last_k_validation
        ),
        beam.pvalue.AsSingleton(vocabularies),
        thresholds,
    ).with_outputs(OOV_TAG, main="files")
    files = beam.pvalue.AsList(written.files)
    counts = {}
    for name in SPLIT_ORDER:
        _ = (
            pipeline
            | f"{name}Split" >> beam.Create([name])
            | f"Finalize{name}" >> beam.Map(lambda split, files: _finalize_shards(files, out_dir, split), files)
        )
        counts[name] = (
            written[OOV_TAG]
            | f"Only{name}" >> beam.FlatMap(lambda item, name=name: [item[1]] if item[0] == name else [])
            | f"Count{name}" >> beam.CombineGlobally(_SumArrays(3))
        )
    dead = third[DEAD_LETTER_TAG]
    ratings = first["ratings"]
    (
        dead
        | "DeadLetterJson" >> beam.Map(_bad_row_json)
        | "WriteDeadLetter"
        >> beam.io.WriteToText(
            os.path.join(out_dir, F.DEAD_LETTER_PREFIX), file_name_suffix=".jsonl"
        )
    )
    invalid = dead | "CountInvalid" >> beam.combiners.Count.Globally()
    summary = ratings | "Stats" >> beam.CombineGlobally(_IdStatsFn())

    def to_json(stats, vocab, train, validation, test, invalid):
        by_split = {F.TRAIN_SPLIT: train, F.VALIDATION_SPLIT: validation, F.TEST_SPLIT: test}
        rows = sum(int(c[0]) for c in by_split.values()) + invalid
        stats = dict(stats)
        stats.update(
            {
                "rows": {name: int(c[0]) for name, c in by_split.items()},
                "invalid_rows": invalid,
                "invalid_share": invalid / rows if rows else 0.0,
                "split": config.split,
                "test_fraction": config.test_fraction,
                "validation_fraction": config.validation_fraction,
                "last_k": config.last_k,
                "split_seed": config.split_seed,
                "stars_range": list(stars_range),
                "superseded_rows": len(superseded),
                "layout": layout.name,
                "explicit": bool(ingestion.get("explicit", True)),
                "vocabulary": {
                    "users": vocab.users.size,
                    "movies": vocab.movies.size,
                    "id_kinds": id_kinds,
                    "min_user_count": config.min_user_count,
                    "min_item_count": config.min_item_count,
                    # Rows whose user / movie is out of vocabulary (index 0), per split.
                    "oov_user_rows": {name: int(c[1]) for name, c in by_split.items()},
                    "oov_movie_rows": {name: int(c[2]) for name, c in by_split.items()},
                },
            }
        )
        return json.dumps(stats, indent=2, sort_keys=True)

    (
        summary
        | "StatsJson"
        >> beam.Map(
            to_json,
            beam.pvalue.AsSingleton(vocabularies),
            *(
                beam.pvalue.AsSingleton(counts[name])
                for name in (F.TRAIN_SPLIT, F.VALIDATION_SPLIT, F.TEST_SPLIT)
            ),
            beam.pvalue.AsSingleton(invalid),
        )
        | "WriteStats"
        >> beam.io.WriteToText(
            os.path.join(out_dir, F.STATS_FILE), shard_name_template="", num_shards=1
        )
    )
    return dead


def read_dead_letters(out_dir: str, limit: int = MAX_REPORTED_PROBLEMS) -> list[str]:
    problems: list[str] = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith(F.DEAD_LETTER_PREFIX):
            with open(os.path.join(out_dir, name), encoding="utf-8") as handle:
                for line in handle:
                    row = json.loads(line)
                    problems.append(f"{row['source']}, line {row['line']}: {row['reason']}")
                    if len(problems) >= limit:
                        return problems
    return problems


def run_preprocessing(
    ratings_dir: str,
    out_dir: str,
    config: PreprocessingConfig,
    beam_args: list[str] | None = None,
    source_name: str | None = None,
) -> dict[str, Any]:
    """Run the Beam pipeline on an ingestion output; returns stats.json's content.

    The outputs appear in `out_dir` only when the run succeeds and the share of malformed rows is
    within `config.max_invalid_share`; otherwise `out_dir` holds only `rejected/` (the dead
    letters) and a DataError names the first bad lines. An earlier run's output is removed
    first, so a failed re-run never leaves TFRecords a later stage could take for its input.
    """
    ratings_path = os.path.join(ratings_dir, F.RATINGS_FILE)
    if not os.path.isfile(ratings_path):
        raise DataError(f"{ratings_path}: not found (expected an ingestion output)")
    ingestion = read_report(ratings_dir)
    if config.split != SPLIT_RANDOM and not ingestion.get("has_timestamps", True):
        raise DataError(
            f"--split {config.split} orders ratings by time, and the interactions have no "
            "timestamp column (use --split random, or pass --timestamp-column)"
        )
    options = PipelineOptions([f"--runner={config.runner}", *(beam_args or [])])
    started = time.perf_counter()
    kept = os.path.join(out_dir, F.REJECTED_DIR)
    rejected = f"{os.path.abspath(out_dir)}{PARTIAL_SUFFIX}{F.REJECTED_DIR}"
    try:
        with atomic_output_dir(out_dir) as staging:
            with beam.Pipeline(options=options) as pipeline:
                build_pipeline(
                    pipeline,
                    [ratings_path],
                    staging,
                    config,
                    {ratings_path: source_name} if source_name else None,
                    ingestion,
                )
            shutil.rmtree(os.path.join(staging, TEMP_DIR), ignore_errors=True)  # emptied
            stats = load_stats(staging)
            if not stats["vocabulary"]["users"] or not stats["vocabulary"]["movies"]:
                raise DataError(
                    f"{ratings_path}: the training split holds no user or movie seen at least "
                    f"--min-user-count {config.min_user_count} / --min-item-count "
                    f"{config.min_item_count} times: nothing to train on"
                )
            stats["seconds"] = round(time.perf_counter() - started, 2)
            with open(os.path.join(staging, F.STATS_FILE), "w", encoding="utf-8") as handle:
                json.dump(stats, handle, indent=2, sort_keys=True)
            if stats["invalid_share"] > config.max_invalid_share:
                os.makedirs(rejected)
                for name in os.listdir(staging):
                    if name.startswith(F.DEAD_LETTER_PREFIX):
                        os.replace(os.path.join(staging, name), os.path.join(rejected, name))
                raise DataError(
                    f"{stats['invalid_rows']} malformed rating row(s) ({stats['invalid_share']:.2%}"
                    f" > max_invalid_share {config.max_invalid_share:.2%}); all of them are "
                    f"listed in {kept}. First: " + "; ".join(read_dead_letters(rejected))
                )
    except DataError:
        if os.path.isdir(rejected):
            os.makedirs(out_dir, exist_ok=True)
            os.replace(rejected, kept)
        raise
    for problem in read_dead_letters(out_dir):
        log.warning("dead letter: %s", problem)
    log.info("preprocessing: %s", json.dumps(stats, sort_keys=True))
    return stats
