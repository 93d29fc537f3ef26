"""The model artifact: training's SavedModel, its signatures, metadata and warmup requests."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from components import features as F
from components.artifacts.examples import load_columns, load_stats
from components.artifacts.saved_model import (
    SIGNATURES,
    WARMUP_FILE,
    ServedModel,
    export_saved_model,
    read_history,
    read_metadata,
    read_warmup_requests,
)
from components.training.seen_movies import SeenMovies

SCORE_ATOL = 1e-5  # scores are O(1) dot products; kernels differ across CPUs by ~1e-7


@pytest.fixture(scope="module")
def all_seen(small_examples, small_model):
    cols = [load_columns(small_examples["examples"], s) for s in F.SPLITS]
    return SeenMovies(
        np.concatenate([c[F.USER_ID] for c in cols]),
        np.concatenate([c[F.MOVIE_ID] for c in cols]),
        small_model.num_users,
    )


@pytest.fixture(scope="module")
def vocab(small_examples):
    from components.artifacts.vocabulary import load_vocabularies

    examples = small_examples["examples"]
    return load_vocabularies(examples, load_stats(examples))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_model, all_seen, vocab):
    base = str(tmp_path_factory.mktemp("serving"))
    return base, export_saved_model(small_model, all_seen, vocab, base, "mtrec")


def test_training_writes_a_complete_servable(small_saved_model):
    assert os.path.isfile(os.path.join(small_saved_model, "saved_model.pb"))
    info = read_metadata(small_saved_model)
    assert info["k"] == 10 and info["signatures"] == list(SIGNATURES)
    assert info["examples_rows"][F.VALIDATION_SPLIT] > 0
    history = read_history(small_saved_model)
    assert len(history["rmse"]) == 3 and len(history["val_rmse"]) == 3  # validation each epoch
    requests = list(read_warmup_requests(small_saved_model))
    assert [r.model_spec.signature_name for r in requests] == list(SIGNATURES)
    assert F.SIGNATURE_RETRIEVE_K in SIGNATURES
    assert not [n for n in os.listdir(os.path.dirname(small_saved_model)) if ".partial-" in n]


def test_layout_is_tf_serving_versioned(exported):
    base, path = exported
    assert path == os.path.join(base, "mtrec", "1")
    assert sorted(os.listdir(os.path.join(base, "mtrec"))) == ["1"]
    with open(os.path.join(path, "assets.extra", "mtrec.json")) as handle:
        assert json.load(handle)["k"] == 10
    assert os.path.isfile(os.path.join(path, "assets.extra", WARMUP_FILE))


def test_signatures_round_trip_equal_the_in_memory_model(exported, small_model, all_seen, vocab):
    """Raw ids in, raw ids out; underneath, the in-memory model on vocabulary indices."""
    loaded = tf.saved_model.load(exported[1])
    assert set(loaded.signatures) == set(SIGNATURES)
    raw_users = np.array([1, 2, 30, 60], np.int64)
    users = tf.constant(vocab.users.lookup(raw_users), tf.int32)
    assert (users.numpy() > 0).all()
    out = loaded.signatures[F.SIGNATURE_RETRIEVE](user_id=tf.constant(raw_users))
    scores, ids = small_model.recommend(users, seen=all_seen)
    np.testing.assert_allclose(
        out[F.OUT_SCORES].numpy(), scores.numpy(), rtol=1e-5, atol=SCORE_ATOL
    )
    # Ids agree wherever the scores are not tied within the tolerance.
    gaps = np.diff(scores.numpy(), axis=1)
    distinct = np.ones_like(ids.numpy(), dtype=bool)
    distinct[:, 1:] &= np.abs(gaps) > 2 * SCORE_ATOL
    distinct[:, :-1] &= np.abs(gaps) > 2 * SCORE_ATOL
    raw_ids = vocab.movies.raw(ids.numpy())
    np.testing.assert_array_equal(out[F.OUT_MOVIE_IDS].numpy()[distinct], raw_ids[distinct])
    assert out[F.OUT_MOVIE_IDS].dtype == tf.int64
    assert not out[F.OUT_COLD_START].numpy().any()
    rated = all_seen.ragged()
    for row, user in enumerate(users.numpy()):
        rated_raw = set(vocab.movies.raw(rated[user].numpy()).tolist())
        assert not set(out[F.OUT_MOVIE_IDS].numpy()[row].tolist()) & rated_raw

    excluded = tf.constant([[1, 2, -1], [-1, -1, -1], [5, -1, -1], [7, 8, 9]], tf.int64)
    out = loaded.signatures[F.SIGNATURE_RETRIEVE_EXCLUDING](
        user_id=tf.constant(raw_users), excluded_movie_ids=excluded
    )
    for row, banned in enumerate(excluded.numpy()):
        assert not set(out[F.OUT_MOVIE_IDS].numpy()[row]) & (set(banned) - {-1})

    raw_movies = np.array([1, 2, 3, 4], np.int64)
    out = loaded.signatures[F.SIGNATURE_RANK](
        user_id=tf.constant(raw_users), movie_id=tf.constant(raw_movies)
    )
    movies = tf.constant(vocab.movies.lookup(raw_movies), tf.int32)
    expected = small_model.predict_rating(users, movies).numpy()
    np.testing.assert_allclose(out[F.OUT_RATING].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[F.OUT_STARS].numpy(), 1 + 4 * expected, rtol=1e-5, atol=4e-6)


def test_served_model_reads_like_a_client(exported, small_model, vocab):
    served = ServedModel(exported[1], vocab)
    top = served.top_k(np.array([1, 2]), [np.array([1, 2, 3]), np.array([], np.int32)])
    assert top.shape == (2, 10) and not set(top[0]) & {1, 2, 3}
    ratings = served.predict_rating(np.array([1, 2]), np.array([3, 4]))
    np.testing.assert_allclose(
        ratings,
        small_model.predict_rating(tf.constant([1, 2]), tf.constant([3, 4])).numpy(),
        atol=1e-6,
    )


def test_an_unknown_user_gets_the_most_popular_movies_flagged_cold_start(
    exported, small_model, vocab
):
    loaded = tf.saved_model.load(exported[1])
    out = loaded.signatures[F.SIGNATURE_RETRIEVE](user_id=tf.constant([2**40, 1], tf.int64))
    assert out[F.OUT_COLD_START].numpy().tolist() == [True, False]
    counts = small_model.movie_counts
    popular = vocab.movies.raw(np.argsort(-counts, kind="stable")[:10])
    got = out[F.OUT_MOVIE_IDS].numpy()[0]
    # The first is the most rated movie; all ten are among the most rated (ties aside).
    assert got[0] == popular[0]
    threshold = np.sort(counts)[-10]
    assert (counts[vocab.movies.lookup(got)] >= threshold).all()
    out = loaded.signatures[F.SIGNATURE_RETRIEVE_K](
        user_id=tf.constant([-5], tf.int64), k=tf.constant(3)
    )
    assert out[F.OUT_MOVIE_IDS].numpy()[0].tolist() == got[:3].tolist()


def test_unknown_movies_are_rejected_with_a_message_naming_them(exported):
    loaded = tf.saved_model.load(exported[1])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"unknown movie_id.*\b4242\b"):
        loaded.signatures[F.SIGNATURE_RANK](
            user_id=tf.constant([1, 1], tf.int64), movie_id=tf.constant([1, 4242], tf.int64)
        )


def test_new_versions_never_overwrite(tmp_path, small_model, all_seen, vocab):
    from components.artifacts.model_versions import list_versions
    from components.errors import DataError

    base = str(tmp_path)
    export_saved_model(small_model, all_seen, vocab, base, "m")
    export_saved_model(small_model, all_seen, vocab, base, "m")
    assert list_versions(os.path.join(base, "m")) == [1, 2]
    with pytest.raises(DataError, match="already exists"):
        export_saved_model(small_model, all_seen, vocab, base, "m", version=2)


def test_signatures_check_batch_shapes(exported):
    loaded = tf.saved_model.load(exported[1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="same batch size"):
        loaded.signatures[F.SIGNATURE_RETRIEVE_EXCLUDING](
            user_id=tf.constant([1], tf.int64), excluded_movie_ids=tf.zeros([2, 3], tf.int64)
        )
    with pytest.raises(tf.errors.InvalidArgumentError, match="same length"):
        loaded.signatures[F.SIGNATURE_RANK](
            user_id=tf.constant([1, 2], tf.int64), movie_id=tf.constant([1], tf.int64)
        )
