"""Vocabularies: raw ids <-> dense indices, computed in Beam on the training split."""

import os
from collections import Counter

import numpy as np
import pytest

from components.artifacts.vocabulary import INT64, OOV_INDEX, STRING, Vocabulary, id_kind_of


@pytest.mark.parametrize(
    "token, kind",
    [
        ("42", INT64),
        ("-7", INT64),
        (str(2**63 - 1), INT64),
        (str(2**63), STRING),  # beyond int64: kept as the string it is
        ("007", STRING),  # not canonical: "7" and "007" must stay different ids
        ("+3", STRING),
        ("1_96", STRING),
        ("١٢", STRING),  # non-ASCII digits
        ("sku-1", STRING),
    ],
)
def test_id_kind(token, kind):
    assert id_kind_of(token) == kind


@pytest.mark.parametrize(
    "kind, counts",
    [
        (INT64, Counter({2**40: 5, 7: 9, -3: 5, 11: 1})),
        (STRING, Counter({"b": 5, "a": 9, "é": 5, "z": 1})),
    ],
)
def test_most_frequent_first_rare_ids_out_of_vocabulary(kind, counts):
    vocab = Vocabulary.from_counts(counts, kind, min_count=2)
    tokens = vocab.tokens.tolist()
    assert len(tokens) == 3 and vocab.rows == 4
    assert counts[tokens[0]] == 9  # most frequent first; ties by raw id
    assert tokens[1:] == sorted(tokens[1:])
    rare = [t for t, n in counts.items() if n < 2][0]
    indices = vocab.lookup([tokens[2], rare, tokens[0]])
    assert indices.tolist() == [3, OOV_INDEX, 1]
    assert vocab.raw(indices).tolist() == [tokens[2], vocab.missing, tokens[0]]
    assert vocab.raw([-1]).tolist() == [vocab.missing]


def test_vocabulary_file_round_trip(tmp_path):
    vocab = Vocabulary.from_counts(Counter({"user 1": 3, "ü": 2, "x": 1}), STRING)
    path = os.path.join(tmp_path, "users.txt")
    vocab.write(path)
    again = Vocabulary.read(path, STRING)
    assert again.tokens.tolist() == vocab.tokens.tolist()
    np.testing.assert_array_equal(again.lookup(["ü", "nope"]), [2, 0])


def test_preprocessing_writes_vocabularies_sized_by_ids_not_by_their_values(tmp_path):
    """A user id of 2**40 and one of 5,000,000 cost one embedding row each."""
    from components.artifacts.examples import load_columns, load_stats
    from components.artifacts.vocabulary import load_vocabularies
    from components.config import PreprocessingConfig
    from components.ingestion.ingest import run_ingestion
    from components.preprocessing.pipeline import run_preprocessing
    from tests.conftest import write_movielens

    data = write_movielens(str(tmp_path / "data"), users=30, movies=20, per_user=10)
    path = os.path.join(data, "u.data")
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    big = {"1": str(2**40), "2": "5000000"}
    rewritten = [
        "\t".join([big.get(f[0], f[0]), *f[1:]]) for f in (line.split("\t") for line in lines)
    ]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(rewritten) + "\n")
    root = str(tmp_path / "out")
    run_ingestion(data, f"{root}/ratings", f"{root}/movies")
    stats = run_preprocessing(
        f"{root}/ratings", f"{root}/examples", PreprocessingConfig(min_item_count=3)
    )
    vocab = load_vocabularies(f"{root}/examples", load_stats(f"{root}/examples"))
    assert stats["vocabulary"]["users"] == vocab.users.size <= 30
    assert {2**40, 5_000_000} <= set(vocab.users.tokens.tolist())
    train = load_columns(f"{root}/examples", "train")
    assert train["user_id"].max() <= vocab.users.size  # indices, not raw ids
    # min_item_count 3: the rarer movies share the out-of-vocabulary row 0
    assert stats["vocabulary"]["oov_movie_rows"]["train"] == int((train["movie_id"] == 0).sum())
    item_counts = np.bincount(train["movie_id"])
    assert (item_counts[1:] >= 3).all()
