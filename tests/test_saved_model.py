"""The model artifact: training's SavedModel, its signatures, metadata and warmup requests."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from components import features as F
from components.examples import load_columns
from components.model import SeenMovies
from components.saved_model import (
    SIGNATURES,
    WARMUP_FILE,
    ServedModel,
    export_saved_model,
    read_history,
    read_metadata,
    read_warmup_requests,
)

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
def exported(tmp_path_factory, small_model, all_seen):
    base = str(tmp_path_factory.mktemp("serving"))
    return base, export_saved_model(small_model, all_seen, base, "mtrec")


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


def test_signatures_round_trip_equal_the_in_memory_model(exported, small_model, all_seen):
    loaded = tf.saved_model.load(exported[1])
    assert set(loaded.signatures) == set(SIGNATURES)
    users = tf.constant([1, 2, 30, 60], tf.int32)
    out = loaded.signatures[F.SIGNATURE_RETRIEVE](user_id=users)
    scores, ids = small_model.recommend(users, seen=all_seen)
    np.testing.assert_allclose(out[F.OUT_SCORES].numpy(), scores.numpy(), rtol=1e-5, atol=SCORE_ATOL)
    # Ids agree wherever the scores are not tied within the tolerance.
    gaps = np.diff(scores.numpy(), axis=1)
    distinct = np.ones_like(ids.numpy(), dtype=bool)
    distinct[:, 1:] &= np.abs(gaps) > 2 * SCORE_ATOL
    distinct[:, :-1] &= np.abs(gaps) > 2 * SCORE_ATOL
    np.testing.assert_array_equal(out[F.OUT_MOVIE_IDS].numpy()[distinct], ids.numpy()[distinct])
    rated = all_seen.ragged()
    for row, user in enumerate(users.numpy()):
        assert not set(out[F.OUT_MOVIE_IDS].numpy()[row]) & set(rated[user].numpy())
    assert (out[F.OUT_MOVIE_IDS].numpy() != 0).all()

    excluded = tf.constant([[1, 2, 0], [0, 0, 0], [5, 0, 0], [7, 8, 9]], tf.int32)
    out = loaded.signatures[F.SIGNATURE_RETRIEVE_EXCLUDING](
        user_id=users, excluded_movie_ids=excluded
    )
    for row, banned in enumerate(excluded.numpy()):
        assert not set(out[F.OUT_MOVIE_IDS].numpy()[row]) & (set(banned) - {0})

    movies = tf.constant([1, 2, 3, 4], tf.int32)
    out = loaded.signatures[F.SIGNATURE_RANK](user_id=users, movie_id=movies)
    expected = small_model.predict_rating(users, movies).numpy()
    np.testing.assert_allclose(out[F.OUT_RATING].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[F.OUT_STARS].numpy(), 1 + 4 * expected, rtol=1e-5, atol=4e-6)


def test_served_model_reads_like_a_client(exported, small_model):
    served = ServedModel(exported[1])
    top = served.top_k(np.array([1, 2]), [np.array([1, 2, 3]), np.array([], np.int32)])
    assert top.shape == (2, 10) and not set(top[0]) & {1, 2, 3}
    ratings = served.predict_rating(np.array([1, 2]), np.array([3, 4]))
    np.testing.assert_allclose(
        ratings, small_model.predict_rating(tf.constant([1, 2]), tf.constant([3, 4])).numpy(),
        atol=1e-6,
    )


def test_unknown_ids_are_rejected_with_a_message(exported):
    loaded = tf.saved_model.load(exported[1])
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="unknown user_id: ids must be in 1..60"
    ):
        loaded.signatures[F.SIGNATURE_RETRIEVE](user_id=tf.constant([61], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="unknown movie_id"):
        loaded.signatures[F.SIGNATURE_RANK](
            user_id=tf.constant([1], tf.int32), movie_id=tf.constant([0], tf.int32)
        )


def test_new_versions_never_overwrite(tmp_path, small_model, all_seen):
    from components.errors import DataError
    from components.layout import list_versions

    base = str(tmp_path)
    export_saved_model(small_model, all_seen, base, "m")
    export_saved_model(small_model, all_seen, base, "m")
    assert list_versions(os.path.join(base, "m")) == [1, 2]
    with pytest.raises(DataError, match="already exists"):
        export_saved_model(small_model, all_seen, base, "m", version=2)


def test_signatures_check_batch_shapes(exported):
    loaded = tf.saved_model.load(exported[1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="same batch size"):
        loaded.signatures[F.SIGNATURE_RETRIEVE_EXCLUDING](
            user_id=tf.constant([1], tf.int32), excluded_movie_ids=tf.zeros([2, 3], tf.int32)
        )
    with pytest.raises(tf.errors.InvalidArgumentError, match="same length"):
        loaded.signatures[F.SIGNATURE_RANK](
            user_id=tf.constant([1, 2], tf.int32), movie_id=tf.constant([1], tf.int32)
        )
