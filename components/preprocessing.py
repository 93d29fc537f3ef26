"""Stage 2, preprocessing (Apache Beam): parse, normalise, split, write TFRecords.

Every rating line is parsed with the ingestion stage's parser; malformed lines go to a dead-letter
output (file, line number, reason) instead of being dropped. Valid rows are normalised to
`(stars - 1) / 4` and split by a seeded hash of (user, movie, timestamp) into exactly
`round(N * test_fraction)` test rows -- deterministic whatever the runner or the file order -- and
written as `tf.train.Example` TFRecords per split, plus `stats.json` (counts and id ranges).

Runs on DirectRunner here; the same transforms run on Dataflow/Flink/Spark: standard Beam pipeline
options pass straight through.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from kfp.dsl import Dataset, Input, Output
from tensorflow.core.example import example_pb2, feature_pb2

from components import features as F
from components.config import PreprocessingConfig
from components.errors import DataError
from components.ingestion import BadRow, Rating, parse_rating_line, read_numbered_lines

log = logging.getLogger(__name__)

BUCKET_BITS = 16  # histogram resolution of the exact-count split
KEY_BITS = 64
DEAD_LETTER_TAG = "dead_letter"
MAX_REPORTED_PROBLEMS = 20


# --- pure helpers ---


def split_key(rating: Rating, seed: int) -> int:
    """A 64-bit pseudo-random key per rating, stable across runs, runners and file order."""
    digest = hashlib.blake2b(
        f"{seed}:{rating.user_id}:{rating.movie_id}:{rating.timestamp}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def find_cut(histogram: list[int], test_fraction: float) -> tuple[int, int, int]:
    """From a histogram of key buckets, find the bucket holding the split point.

    Returns (bucket, rank within that bucket (1-based), number of test rows). Rows whose key is
    at most the `rank`-th smallest key of `bucket` (or in a lower bucket) form the test split.
    """
    total = sum(histogram)
    n_test = int(round(total * test_fraction))
    if n_test == 0:
        return -1, 0, 0
    cumulative = 0
    for bucket, count in enumerate(histogram):
        if cumulative + count >= n_test:
            return bucket, n_test - cumulative, n_test
        cumulative += count
    raise AssertionError("unreachable: n_test <= total")


def to_example(rating: Rating) -> bytes:
    """Serialise a rating as a tf.train.Example (the trainer's input format)."""

    def ints(value: int) -> feature_pb2.Feature:
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[value]))

    def floats(value: float) -> feature_pb2.Feature:
        return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[value]))

    example = example_pb2.Example(
        features=feature_pb2.Features(
            feature={
                F.USER_ID: ints(rating.user_id),
                F.MOVIE_ID: ints(rating.movie_id),
                F.RATING: floats(F.normalise_stars(rating.stars)),
                F.STARS: floats(rating.stars),
                F.TIMESTAMP: ints(rating.timestamp),
            }
        )
    )
    return example.SerializeToString()


# --- Beam transforms ---


class ReadNumberedLines(beam.PTransform):
    """file paths -> (path, line number, line). Streams each file; line numbers make dead letters
    point at the original line."""

    def __init__(self, paths: list[str], source_names: dict[str, str] | None = None):
        super().__init__()
        self._paths = paths
        self._names = source_names or {}

    def expand(self, pbegin):
        names = self._names

        def read(path: str) -> Iterator[tuple[str, int, str]]:
            for number, line in read_numbered_lines(path):
                yield names.get(path, path), number, line

        return (
            pbegin
            | "Paths" >> beam.Create(self._paths)
            | "Read" >> beam.FlatMap(read)
            | "Spread" >> beam.Reshuffle()
        )


class _ParseDoFn(beam.DoFn):
    def process(self, element: tuple[str, int, str]) -> Iterable[Any]:
        source, number, line = element
        parsed = parse_rating_line(line, source, number)
        if isinstance(parsed, BadRow):
            yield beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, parsed)
        else:
            yield parsed


class ParseRatings(beam.PTransform):
    """(source, line number, line) -> Rating, with a `dead_letter` output of BadRow."""

    def expand(self, lines):
        outputs = lines | "Parse" >> beam.ParDo(_ParseDoFn()).with_outputs(
            DEAD_LETTER_TAG, main="ratings"
        )
        return {"ratings": outputs.ratings, DEAD_LETTER_TAG: outputs[DEAD_LETTER_TAG]}


class _HistogramFn(beam.CombineFn):
    def create_accumulator(self) -> list[int]:
        return [0] * (1 << BUCKET_BITS)

    def add_input(self, acc: list[int], key: int) -> list[int]:
        acc[key >> (KEY_BITS - BUCKET_BITS)] += 1
        return acc

    def merge_accumulators(self, accs: Iterable[list[int]]) -> list[int]:
        merged = [0] * (1 << BUCKET_BITS)
        for acc in accs:
            for i, count in enumerate(acc):
                if count:
                    merged[i] += count
        return merged

    def extract_output(self, acc: list[int]) -> list[int]:
        return acc


class SplitRatings(beam.PTransform):
    """Rating -> {"train", "test"}: exactly round(N * test_fraction) rows in test, chosen by the
    smallest seeded hash keys. Two small global aggregations (a 65,536-bucket histogram and the
    keys of one bucket) keep it exact without collecting the data set anywhere."""

    def __init__(self, test_fraction: float, seed: int):
        super().__init__()
        self._fraction = test_fraction
        self._seed = seed

    def expand(self, ratings):
        seed, fraction = self._seed, self._fraction
        keyed = ratings | "Key" >> beam.Map(lambda r: (split_key(r, seed), r))
        histogram = (
            keyed
            | "Keys" >> beam.Map(lambda kr: kr[0])
            | "Histogram" >> beam.CombineGlobally(_HistogramFn())
        )
        cut_bucket = histogram | "FindBucket" >> beam.Map(find_cut, fraction)
        shift = KEY_BITS - BUCKET_BITS

        def keys_in_bucket(kr, cut):
            if kr[0] >> shift == cut[0]:
                yield kr[0]

        def cut_key(keys: list[int], cut) -> int:
            bucket, rank, _ = cut
            if bucket < 0:
                return -1  # empty test split
            return sorted(keys)[rank - 1]

        threshold = (
            keyed
            | "BucketKeys" >> beam.FlatMap(keys_in_bucket, beam.pvalue.AsSingleton(cut_bucket))
            | "CollectBucket" >> beam.combiners.ToList()
            | "CutKey" >> beam.Map(cut_key, beam.pvalue.AsSingleton(cut_bucket))
        )

        def assign(kr, n_partitions: int, cut: int) -> int:
            return 1 if kr[0] <= cut else 0

        train, test = keyed | "Assign" >> beam.Partition(
            assign, 2, beam.pvalue.AsSingleton(threshold)
        )
        return {
            F.TRAIN_SPLIT: train | "TrainRows" >> beam.Values(),
            F.TEST_SPLIT: test | "TestRows" >> beam.Values(),
        }


class _StatsFn(beam.CombineFn):
    """Distinct users/movies and max ids of the valid rows."""

    def create_accumulator(self):
        return set(), set()

    def add_input(self, acc, rating: Rating):
        acc[0].add(rating.user_id)
        acc[1].add(rating.movie_id)
        return acc

    def merge_accumulators(self, accs):
        users, movies = set(), set()
        for u, m in accs:
            users |= u
            movies |= m
        return users, movies

    def extract_output(self, acc):
        users, movies = acc
        return {
            "users": len(users),
            "movies": len(movies),
            "max_user_id": max(users, default=0),
            "max_movie_id": max(movies, default=0),
        }


def _bad_row_json(bad: BadRow) -> str:
    return json.dumps(
        {"source": bad.source, "line": bad.line_number, "reason": bad.reason, "text": bad.line}
    )


def build_pipeline(
    pipeline: beam.Pipeline,
    ratings_paths: list[str],
    out_dir: str,
    config: PreprocessingConfig,
    source_names: dict[str, str] | None = None,
):
    """Wire the transforms: read -> parse (+dead letter) -> split -> TFRecords + stats.json."""
    lines = pipeline | "ReadRatings" >> ReadNumberedLines(ratings_paths, source_names)
    parsed = lines | "ParseRatings" >> ParseRatings()
    ratings, dead = parsed["ratings"], parsed[DEAD_LETTER_TAG]
    splits = ratings | "Split" >> SplitRatings(config.test_fraction, config.split_seed)

    counts = {}
    for name, rows in splits.items():
        (
            rows
            | f"Serialize{name}" >> beam.Map(to_example)
            | f"Write{name}"
            >> beam.io.WriteToTFRecord(os.path.join(out_dir, name), file_name_suffix=".tfrecord")
        )
        counts[name] = rows | f"Count{name}" >> beam.combiners.Count.Globally()
    (
        dead
        | "DeadLetterJson" >> beam.Map(_bad_row_json)
        | "WriteDeadLetter"
        >> beam.io.WriteToText(
            os.path.join(out_dir, F.DEAD_LETTER_PREFIX), file_name_suffix=".jsonl"
        )
    )
    counts["invalid"] = dead | "CountInvalid" >> beam.combiners.Count.Globally()
    summary = ratings | "Stats" >> beam.CombineGlobally(_StatsFn())

    def to_json(stats, train, test, invalid):
        rows = train + test + invalid
        stats = dict(stats)
        stats.update(
            {
                "rows": {F.TRAIN_SPLIT: train, F.TEST_SPLIT: test},
                "invalid_rows": invalid,
                "invalid_share": invalid / rows if rows else 0.0,
                "test_fraction": config.test_fraction,
                "split_seed": config.split_seed,
            }
        )
        return json.dumps(stats, indent=2, sort_keys=True)

    (
        summary
        | "StatsJson"
        >> beam.Map(
            to_json,
            beam.pvalue.AsSingleton(counts[F.TRAIN_SPLIT]),
            beam.pvalue.AsSingleton(counts[F.TEST_SPLIT]),
            beam.pvalue.AsSingleton(counts["invalid"]),
        )
        | "WriteStats"
        >> beam.io.WriteToText(
            os.path.join(out_dir, F.STATS_FILE), shard_name_template="", num_shards=1
        )
    )
    return splits, dead


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

    Outputs are written to a staging folder and moved into `out_dir` only when the run succeeds and
    the share of malformed rows is within `config.max_invalid_share`; otherwise only the dead-letter
    files are kept, and a DataError names the first bad lines.
    """
    ratings_path = os.path.join(ratings_dir, F.RATINGS_FILE)
    if not os.path.isfile(ratings_path):
        raise DataError(f"{ratings_path}: not found (expected an ingestion output)")
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".preprocess-", dir=out_dir)
    options = PipelineOptions([f"--runner={config.runner}", *(beam_args or [])])
    try:
        with beam.Pipeline(options=options) as pipeline:
            build_pipeline(
                pipeline,
                [ratings_path],
                staging,
                config,
                {ratings_path: source_name} if source_name else None,
            )
        with open(os.path.join(staging, F.STATS_FILE), encoding="utf-8") as handle:
            stats = json.load(handle)
        if stats["invalid_share"] > config.max_invalid_share:
            kept = os.path.join(out_dir, "rejected")
            os.makedirs(kept, exist_ok=True)
            for name in os.listdir(staging):
                if name.startswith(F.DEAD_LETTER_PREFIX):
                    os.replace(os.path.join(staging, name), os.path.join(kept, name))
            problems = read_dead_letters(kept)
            raise DataError(
                f"{stats['invalid_rows']} malformed rating row(s) "
                f"({stats['invalid_share']:.2%} > max_invalid_share {config.max_invalid_share:.2%}); "
                f"all of them are listed in {kept}. First: " + "; ".join(problems)
            )
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for problem in read_dead_letters(out_dir):
        log.warning("dead letter: %s", problem)
    log.info("preprocessing: %s", json.dumps(stats, sort_keys=True))
    return stats


def split_files(examples_dir: str, split: str) -> list[str]:
    """The TFRecord shards of one split inside a preprocessing output."""
    files = sorted(
        os.path.join(examples_dir, name)
        for name in os.listdir(examples_dir)
        if name.startswith(split + "-") and name.endswith(".tfrecord")
    )
    if not files:
        raise DataError(f"{examples_dir}: no {split} TFRecords (expected a preprocessing output)")
    return files


def load_stats(examples_dir: str) -> dict[str, Any]:
    path = os.path.join(examples_dir, F.STATS_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found (expected a preprocessing output)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# --- KFP component ---


def preprocessing_op(
    ratings: Input[Dataset], preprocessing_config: dict, examples: Output[Dataset]
):
    """Beam: parse, normalise and split the ratings into TFRecords (+ stats.json, dead letters)."""
    import logging

    from components.config import PreprocessingConfig
    from components.errors import exit_on_error
    from components.preprocessing import run_preprocessing

    logging.basicConfig(level=logging.INFO)
    with exit_on_error():
        config = PreprocessingConfig.from_dict(preprocessing_config)
        stats = run_preprocessing(
            ratings.path, examples.path, config, source_name=ratings.metadata.get("source")
        )
        examples.metadata.update({"rows": stats["rows"], "invalid_rows": stats["invalid_rows"]})
