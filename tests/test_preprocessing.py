import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from components import features as F
from components.artifacts.examples import encode_example, split_files
from components.config import PreprocessingConfig
from components.errors import DataError
from components.ingestion.layouts import INTERACTIONS, ML_100K, ML_CSV, ML_DAT
from components.ingestion.parsing import BadRow, parse_block, parse_rating_line
from components.preprocessing.parse import DEAD_LETTER_TAG, ParseRatings, ParseSettings
from components.preprocessing.pipeline import run_preprocessing
from components.preprocessing.splits import (
    SPLIT_ORDER,
    SplitRatings,
    assign_splits,
    find_cuts,
    split_keys,
    split_sizes,
)


def _options():
    return beam.options.pipeline_options.PipelineOptions(["--runner=DirectRunner"])


def _rows(chunk):
    return [
        (int(u), int(m), float(s), int(t))
        for u, m, s, t in zip(
            chunk["users"], chunk["movies"], chunk["stars"], chunk["timestamps"], strict=True
        )
    ]


def test_parse_ratings_sends_malformed_lines_to_dead_letter():
    chunk = (
        "u.data",
        1,
        b"1\t10\t5\t100\n2\t11\t3\n3\tx\t4\t100\n4\t12\t7\t100\n5\t13\t1\t100\n1_96\t13\t1\t100\n",
    )
    with TestPipeline(options=_options()) as p:
        out = p | beam.Create([chunk]) | ParseRatings(ParseSettings(seed=1))
        assert_that(
            out["ratings"] | beam.FlatMap(_rows),
            equal_to([(1, 10, 5.0, 100), (5, 13, 1.0, 100)]),
            label="ok",
        )
        assert_that(
            out[DEAD_LETTER_TAG] | beam.Map(lambda b: (b.source, b.line_number, b.reason)),
            equal_to(
                [
                    ("u.data", 2, "expected 4 tab-separated fields, got 3"),
                    ("u.data", 3, "field movie_id is not an integer ('x')"),
                    ("u.data", 4, "field stars must be whole stars in 1..5, got 7"),
                    ("u.data", 6, "field user_id is not an integer ('1_96')"),
                ]
            ),
            label="dead",
        )


def _chunks(n, size):
    users = 1 + np.arange(n) % 17
    movies = 1 + np.arange(n) // 17
    times = 1000 + np.arange(n)
    keys = split_keys(users, movies, times, seed=7)
    columns = {
        "users": users, "movies": movies, "stars": 1.0 + np.arange(n) % 5, "timestamps": times,
        "keys": keys,
    }  # fmt: skip
    return [{k: v[i : i + size] for k, v in columns.items()} for i in range(0, n, size)], keys


@pytest.mark.parametrize(
    "layout, text",
    [
        (ML_100K, "1\t10\t5\t100\n2\t11\t3\t101\r\n"),
        (ML_DAT, "1::10::4.5::100\n2::11::0.5::-5\n"),
        (ML_CSV, "1,10,4.5,100\n" + str(2**63 - 1) + ",11,5.0,7\n"),
        (INTERACTIONS, "u 1\tsku:9\t-2.5e1\t100\nü\tx,y\t3\t0\n"),
    ],
)
def test_the_block_fast_path_parses_as_the_line_parser(layout, text):
    kinds = {"user": "string", "movie": "string"}
    fast = parse_block(text, layout, kinds)
    assert fast is not None
    rows = [parse_rating_line(line, "f", 1, layout, kinds) for line in text.splitlines(True)]
    assert fast["users"].tolist() == [r.user_id for r in rows]
    assert fast["movies"].tolist() == [r.movie_id for r in rows]
    assert fast["stars"].tolist() == [r.stars for r in rows]
    assert fast["timestamps"].tolist() == [r.timestamp for r in rows]


@pytest.mark.parametrize(
    "text",
    [
        "1\t10\t5\t100\n\n",  # a blank line
        "1_96\t10\t5\t100\n",
        "0\t10\t5\t100\n",  # ids are positive
        "1\t10\t6\t100\n",  # above the scale
        "1\t10\t4.5\t100\n",  # half stars in a whole-star release
        str(2**63) + "\t10\t5\t100\n",  # beyond int64
        " 1\t10\t5\t100\n",
        "1\t10\t5\t100",  # no line end: the caller adds one
    ],
)
def test_a_block_with_any_bad_line_takes_the_line_by_line_path(text):
    assert parse_block(text, ML_100K) is None


@pytest.mark.parametrize(
    ("n", "test", "validation"),
    [(100, 0.2, 0.1), (37, 0.5, 0.0), (10, 0.01, 0.3), (500, 0.33, 0.25)],
)
def test_split_is_exact_and_follows_the_hash_order(n, test, validation):
    chunks, keys = _chunks(n, size=13)
    sizes = split_sizes(n, test, validation)
    order = np.argsort(keys)
    ranks = np.empty(n, dtype=int)
    ranks[order] = np.arange(n)
    expected = {
        F.TEST_SPLIT: sorted(np.flatnonzero(ranks < sizes[F.TEST_SPLIT]).tolist()),
        F.VALIDATION_SPLIT: sorted(
            np.flatnonzero(
                (ranks >= sizes[F.TEST_SPLIT])
                & (ranks < sizes[F.TEST_SPLIT] + sizes[F.VALIDATION_SPLIT])
            ).tolist()
        ),
    }
    expected[F.TRAIN_SPLIT] = sorted(
        set(range(n)) - set(expected[F.TEST_SPLIT]) - set(expected[F.VALIDATION_SPLIT])
    )
    with TestPipeline(options=_options()) as p:
        rows = p | beam.Create(chunks)
        split = {"first": rows, "second": rows} | SplitRatings(test, validation)
        thresholds = beam.pvalue.AsSingleton(split["thresholds"])
        for code, name in enumerate(SPLIT_ORDER):
            # Row i has timestamp 1000 + i: recover the row indices of each split.
            def of_split(chunk, thresholds, code=code):
                keep = assign_splits(chunk["keys"], thresholds) == code
                return (chunk["timestamps"][keep] - 1000).tolist()

            got = rows | f"Rows{name}" >> beam.FlatMap(of_split, thresholds)
            assert_that(got, equal_to(expected[name]), label=name)
        # The training split's id counts: the rows above the validation cut, exactly.
        all_users = np.concatenate([c["users"] for c in chunks])
        train_users = sorted(all_users[expected[F.TRAIN_SPLIT]].tolist())
        counted = split["train_counts"] | beam.FlatMap(lambda counts: sorted(counts[0].elements()))
        assert_that(counted, equal_to(train_users), label="train counts")


def test_split_keys_depend_on_the_seed_and_the_row_not_on_the_chunking():
    users, movies, times = np.array([1, 2, 3]), np.array([4, 5, 6]), np.array([7, 8, 9])
    keys = split_keys(users, movies, times, seed=42)
    assert keys.dtype == np.uint64 and len(set(keys.tolist())) == 3
    assert not np.array_equal(keys, split_keys(users, movies, times, seed=43))
    one_at_a_time = [
        split_keys(users[i : i + 1], movies[i : i + 1], times[i : i + 1], 42)[0] for i in range(3)
    ]
    assert keys.tolist() == one_at_a_time
    swapped = split_keys(movies, users, times, seed=42)
    assert not np.array_equal(keys, swapped)


def test_find_cuts_and_assign():
    histogram = np.array([3, 0, 5, 2])
    assert find_cuts(histogram, [5, 0, 10]) == [(2, 2), (-1, 0), (3, 2)]
    keys = np.array([5, 1, 9, 3], dtype=np.uint64)
    assert assign_splits(keys, (np.uint64(1), np.uint64(5))).tolist() == [1, 0, 2, 1]
    assert assign_splits(keys, (None, None)).tolist() == [2, 2, 2, 2]
    big = np.array([2**64 - 1, 2**63], dtype=np.uint64)
    assert assign_splits(big, (np.uint64(2**63), None)).tolist() == [2, 0]
    assert split_sizes(100, 0.2, 0.1) == {"test": 20, "validation": 8, "train": 72}


def test_encoded_examples_parse_as_tf_examples():
    record = encode_example(
        {F.USER_ID: 7, F.MOVIE_ID: 2**40, F.RATING: 1.0, F.STARS: 5.0, F.TIMESTAMP: -3}
    )
    example = tf.train.Example.FromString(record)
    features = example.features.feature
    assert features[F.USER_ID].int64_list.value == [7]
    assert features[F.MOVIE_ID].int64_list.value == [2**40]
    assert features[F.TIMESTAMP].int64_list.value == [-3]
    assert features[F.STARS].float_list.value == [5.0]
    assert F.normalise_stars(1) == 0.0 and F.normalise_stars(3) == 0.5


def test_run_preprocessing_writes_splits_and_stats(small_examples, small_data_dir):
    examples = small_examples["examples"]
    with open(os.path.join(examples, F.STATS_FILE)) as handle:
        stats = json.load(handle)
    with open(os.path.join(small_data_dir, "u.data")) as handle:
        total = sum(1 for _ in handle)
    n_test = round(total * 0.2)
    n_validation = round((total - n_test) * 0.1)
    assert stats["rows"] == {
        "train": total - n_test - n_validation, "validation": n_validation, "test": n_test
    }  # fmt: skip
    assert stats["invalid_rows"] == 0
    assert stats["users"] == 60 and stats["movies"] <= 40
    vocabulary = stats["vocabulary"]
    assert vocabulary["users"] == 60 and vocabulary["movies"] <= 40
    assert vocabulary["id_kinds"] == {"user": "int64", "movie": "int64"}
    assert vocabulary["oov_user_rows"]["train"] == vocabulary["oov_movie_rows"]["train"] == 0
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
    assert "line 2: field stars must be whole stars in 1..5, got 9" in message
    assert sorted(os.listdir(out)) == ["rejected"]
    (dead,) = os.listdir(out / "rejected")
    row = json.loads((out / "rejected" / dead).read_text())
    assert row["line"] == 2 and row["text"] == "1\t3\t9\t4"


def test_malformed_share_within_the_limit_is_counted_and_kept_as_dead_letter(tmp_path):
    ratings = _ratings_dir(tmp_path, "1\t2\t3\t4\n1\t3\t9\t4\n2\t2\t5\t4\n2\t4\t1\t4\n")
    out = tmp_path / "examples"
    stats = run_preprocessing(ratings, str(out), PreprocessingConfig(max_invalid_share=0.5))
    assert stats["invalid_rows"] == 1 and stats["invalid_share"] == 0.25
    assert sum(stats["rows"].values()) == 3
    dead = [n for n in os.listdir(out) if n.startswith(F.DEAD_LETTER_PREFIX)]
    assert len(dead) == 1


def test_a_failed_rerun_removes_the_previous_outputs(tmp_path):
    """A later stage must never take an earlier run's TFRecords for this run's output."""
    good = _ratings_dir(tmp_path, "1\t2\t3\t4\n1\t3\t4\t4\n2\t2\t5\t4\n2\t4\t1\t4\n")
    out = tmp_path / "examples"
    run_preprocessing(good, str(out), PreprocessingConfig())
    assert split_files(str(out), F.TRAIN_SPLIT)
    (tmp_path / "ratings" / F.RATINGS_FILE).write_text("1\t2\t3\t4\n1\t3\t9\t4\n")
    with pytest.raises(DataError):
        run_preprocessing(good, str(out), PreprocessingConfig())
    assert sorted(os.listdir(out)) == ["rejected"]
    with pytest.raises(DataError, match="no train TFRecords"):
        split_files(str(out), F.TRAIN_SPLIT)
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def _read_split(out, split):
    from components.artifacts.examples import load_columns

    columns = load_columns(str(out), split)
    return sorted(zip(columns[F.USER_ID].tolist(), columns[F.TIMESTAMP].tolist(), strict=True))


def test_temporal_split_holds_out_the_newest_rows(tmp_path):
    lines = "".join(f"{1 + i % 3}\t{1 + i}\t4\t{1000 + (i * 7) % 20}\n" for i in range(20))
    ratings = _ratings_dir(tmp_path, lines)
    out = tmp_path / "examples"
    stats = run_preprocessing(
        ratings,
        str(out),
        PreprocessingConfig(split="temporal", test_fraction=0.25, validation_fraction=0.2),
    )
    assert (
        stats["rows"] == {"test": 5, "validation": 3, "train": 12} and stats["split"] == "temporal"
    )
    newest = [t for _, t in _read_split(out, F.TEST_SPLIT)]
    middle = [t for _, t in _read_split(out, F.VALIDATION_SPLIT)]
    oldest = [t for _, t in _read_split(out, F.TRAIN_SPLIT)]
    assert min(newest) > max(middle) and min(middle) > max(oldest)


def test_last_k_split_holds_out_each_users_newest(tmp_path):
    lines = "".join(f"{1 + i % 4}\t{1 + i}\t4\t{2000 - i}\n" for i in range(24))
    ratings = _ratings_dir(tmp_path, lines)
    out = tmp_path / "examples"
    run_preprocessing(
        ratings, str(out), PreprocessingConfig(split="last-k", last_k=2, validation_fraction=0.0)
    )
    test = _read_split(out, F.TEST_SPLIT)
    # User u rated at 2000 - i for i = u-1, u+3, ...: the two newest are i = u-1 and u+3.
    assert test == sorted((u, 2000 - i) for u in range(1, 5) for i in (u - 1, u + 3))
    assert len(_read_split(out, F.TRAIN_SPLIT)) == 16


def test_bad_row_describe():
    assert BadRow("f", 3, "why", "text").describe() == "f, line 3: why: 'text'"
