import json
import os

import apache_beam as beam
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from components import features as F
from components.config import PreprocessingConfig
from components.errors import DataError
from components.ingestion import BadRow, Rating
from components.preprocessing import (
    DEAD_LETTER_TAG,
    ParseRatings,
    SplitRatings,
    find_cut,
    run_preprocessing,
    split_files,
    split_key,
    to_example,
)


def _options():
    return beam.options.pipeline_options.PipelineOptions(["--runner=DirectRunner"])


def test_parse_ratings_sends_malformed_lines_to_dead_letter():
    lines = [
        ("u.data", 1, "1\t10\t5\t100\n"),
        ("u.data", 2, "2\t11\t3\n"),
        ("u.data", 3, "3\tx\t4\t100\n"),
        ("u.data", 4, "4\t12\t7\t100\n"),
        ("u.data", 5, "5\t13\t1\t100\n"),
    ]
    with TestPipeline(options=_options()) as p:
        out = p | beam.Create(lines) | ParseRatings()
        assert_that(
            out["ratings"], equal_to([Rating(1, 10, 5.0, 100), Rating(5, 13, 1.0, 100)]), label="ok"
        )
        assert_that(
            out[DEAD_LETTER_TAG] | beam.Map(lambda b: (b.source, b.line_number, b.reason)),
            equal_to(
                [
                    ("u.data", 2, "expected 4 tab-separated fields, got 3"),
                    ("u.data", 3, "field movie_id is not an integer ('x')"),
                    ("u.data", 4, "field stars must be in 1..5, got 7"),
                ]
            ),
            label="dead",
        )


def _ratings(n):
    return [Rating(1 + i % 17, 1 + i // 17, float(1 + i % 5), 1000 + i) for i in range(n)]


@pytest.mark.parametrize(("n", "fraction"), [(100, 0.2), (37, 0.5), (10, 0.01), (500, 0.33)])
def test_split_is_exact_and_matches_the_hash_order(n, fraction):
    ratings = _ratings(n)
    expected_test = round(n * fraction)
    by_key = sorted(ratings, key=lambda r: split_key(r, 7))
    with TestPipeline(options=_options()) as p:
        splits = p | beam.Create(ratings) | SplitRatings(fraction, seed=7)
        assert_that(splits[F.TEST_SPLIT], equal_to(by_key[:expected_test]), label="test")
        assert_that(splits[F.TRAIN_SPLIT], equal_to(by_key[expected_test:]), label="train")


def test_split_depends_on_the_seed_not_on_order():
    ratings = _ratings(50)
    assert split_key(ratings[0], 1) != split_key(ratings[0], 2)
    assert split_key(ratings[3], 42) == split_key(Rating(*ratings[3]), 42)


def test_find_cut():
    assert find_cut([3, 0, 5, 2], 0.5) == (2, 2, 5)
    assert find_cut([10], 0.0) == (-1, 0, 0)
    assert find_cut([4, 4], 1.0) == (1, 4, 8)


def test_to_example_round_trip():
    parsed = tf.io.parse_single_example(
        to_example(Rating(7, 9, 5.0, 123)),
        {
            F.USER_ID: tf.io.FixedLenFeature([], tf.int64),
            F.MOVIE_ID: tf.io.FixedLenFeature([], tf.int64),
            F.RATING: tf.io.FixedLenFeature([], tf.float32),
            F.STARS: tf.io.FixedLenFeature([], tf.float32),
        },
    )
    assert int(parsed[F.USER_ID]) == 7 and int(parsed[F.MOVIE_ID]) == 9
    assert float(parsed[F.RATING]) == 1.0 and float(parsed[F.STARS]) == 5.0
    assert F.normalise_stars(1) == 0.0 and F.normalise_stars(3) == 0.5


def test_run_preprocessing_writes_splits_and_stats(small_examples, small_data_dir):
    examples = small_examples["examples"]
    with open(os.path.join(examples, F.STATS_FILE)) as handle:
        stats = json.load(handle)
    with open(os.path.join(small_data_dir, "u.data")) as handle:
        total = sum(1 for _ in handle)
    assert stats["rows"] == {"train": total - round(total * 0.2), "test": round(total * 0.2)}
    assert stats["invalid_rows"] == 0
    assert stats["max_user_id"] == 60 and stats["max_movie_id"] <= 40
    counted = sum(
        1 for f in split_files(examples, F.TEST_SPLIT) for _ in tf.data.TFRecordDataset(f)
    )
    assert counted == stats["rows"]["test"]


def _ratings_dir(tmp_path, text):
    ratings = tmp_path / "ratings"
    ratings.mkdir()
    (ratings / F.RATINGS_FILE).write_text(text)
    return str(ratings)


def test_malformed_share_over_the_limit_fails_and_keeps_nothing_half_written(tmp_path):
    ratings = _ratings_dir(tmp_path, "1\t2\t3\t4\n1\t3\t9\t4\n2\t2\t5\t4\n2\t4\t1\t4\n")
    out = tmp_path / "examples"
    with pytest.raises(DataError) as err:
        run_preprocessing(ratings, str(out), PreprocessingConfig(max_invalid_share=0.1))
    message = str(err.value)
    assert "1 malformed rating row(s)" in message
    assert "line 2: field stars must be in 1..5, got 9" in message
    assert sorted(os.listdir(out)) == ["rejected"]
    (dead,) = os.listdir(out / "rejected")
    row = json.loads((out / "rejected" / dead).read_text())
    assert row["line"] == 2 and row["text"] == "1\t3\t9\t4"


def test_malformed_share_within_the_limit_is_counted_and_kept_as_dead_letter(tmp_path):
    ratings = _ratings_dir(tmp_path, "1\t2\t3\t4\n1\t3\t9\t4\n2\t2\t5\t4\n2\t4\t1\t4\n")
    out = tmp_path / "examples"
    stats = run_preprocessing(ratings, str(out), PreprocessingConfig(max_invalid_share=0.5))
    assert stats["invalid_rows"] == 1 and stats["invalid_share"] == 0.25
    assert stats["rows"]["train"] + stats["rows"]["test"] == 3
    dead = [n for n in os.listdir(out) if n.startswith(F.DEAD_LETTER_PREFIX)]
    assert len(dead) == 1


def test_bad_row_describe():
    assert BadRow("f", 3, "why", "text").describe() == "f, line 3: why: 'text'"
