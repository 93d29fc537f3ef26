import json
import os

import numpy as np
import pytest
import tensorflow as tf

from components import features as F
from components.dataset import load_columns
from components.errors import GateError
from components.export import export_saved_model, run_export
from components.layout import list_versions
from components.model import SeenMovies


@pytest.fixture(scope="module")
def all_seen(small_examples, small_model):
    cols = [load_columns(small_examples["examples"], s) for s in (F.TRAIN_SPLIT, F.TEST_SPLIT)]
    return SeenMovies(
        np.concatenate([c[F.USER_ID] for c in cols]),
        np.concatenate([c[F.MOVIE_ID] for c in cols]),
        small_model.num_users,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_model, all_seen):
    base = str(tmp_path_factory.mktemp("serving"))
    return base, export_saved_model(small_model, all_seen, base, "mtrec")


def test_layout_is_tf_serving_versioned(exported):
    base, path = exported
    assert path == os.path.join(base, "mtrec", "1")
    assert sorted(os.listdir(os.path.join(base, "mtrec"))) == ["1"]  # no staging left behind
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    with open(os.path.join(path, "assets.extra", "mtrec.json")) as handle:
        info = json.load(handle)
    assert info["version"] == 1 and info["k"] == 10


def test_signatures_round_trip_equal_the_in_memory_model(exported, small_model, all_seen):
    loaded = tf.saved_model.load(exported[1])
    assert set(loaded.signatures) == {
        F.SIGNATURE_RETRIEVE,
        F.SIGNATURE_RETRIEVE_EXCLUDING,
        F.SIGNATURE_RANK,
        F.SIGNATURE_RETRIEVE_K,
    }
    users = tf.constant([1, 2, 30, 60], tf.int32)
    out = loaded.signatures[F.SIGNATURE_RETRIEVE](user_id=users)
    scores, ids = small_model.recommend(users, seen=all_seen)
    np.testing.assert_array_equal(out[F.OUT_MOVIE_IDS].numpy(), ids.numpy())
    np.testing.assert_allclose(out[F.OUT_SCORES].numpy(), scores.numpy(), rtol=1e-6)
    # Nothing the user rated comes back, and never the padding id.
    rated = all_seen.ragged()
    for row, user in enumerate(users.numpy()):
        assert not set(out[F.OUT_MOVIE_IDS].numpy()[row]) & set(rated[user].numpy())
    assert (out[F.OUT_MOVIE_IDS].numpy() != 0).all()

    excluded = tf.constant([[1, 2, 0], [0, 0, 0], [5, 0, 0], [7, 8, 9]], tf.int32)
    out = loaded.signatures[F.SIGNATURE_RETRIEVE_EXCLUDING](
        user_id=users, excluded_movie_ids=excluded
    )
    _, ids = small_model.recommend(users, excluded_movie_ids=excluded)
    np.testing.assert_array_equal(out[F.OUT_MOVIE_IDS].numpy(), ids.numpy())

    movies = tf.constant([1, 2, 3, 4], tf.int32)
    out = loaded.signatures[F.SIGNATURE_RANK](user_id=users, movie_id=movies)
    expected = small_model.predict_rating(users, movies).numpy()
    np.testing.assert_allclose(out[F.OUT_RATING].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(out[F.OUT_STARS].numpy(), 1 + 4 * expected, rtol=1e-6)


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
    base = str(tmp_path)
    export_saved_model(small_model, all_seen, base, "m")
    export_saved_model(small_model, all_seen, base, "m")
    assert list_versions(os.path.join(base, "m")) == [1, 2]
    with pytest.raises(GateError, match="already exists"):
        export_saved_model(small_model, all_seen, base, "m", version=2)


def test_export_refuses_an_unblessed_model(tmp_path, small_examples, small_model):
    model_dir = str(tmp_path / "model")
    small_model.save_artifact(model_dir)
    blessing = tmp_path / "blessing"
    blessing.mkdir()
    (blessing / "blessing.json").write_text(
        json.dumps({"blessed": False, "gates": [{"name": "rmse", "passed": False}]})
    )
    with pytest.raises(GateError, match=r"not blessed \(failed gates: rmse\)"):
        run_export(model_dir, small_examples["examples"], str(blessing), str(tmp_path / "s"), "m")
    assert not (tmp_path / "s").exists()


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
