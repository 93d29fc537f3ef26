import numpy as np
import pytest
import tensorflow as tf

from components import features as F
from components.config import DEFAULT_TRAINING
from components.model import NO_MOVIE, Recommender, SeenMovies


def _tiny_model(**changes):
    counts = np.array([0, 5, 3, 2, 0, 1])  # movie 4 never rated in training: not a candidate
    config = DEFAULT_TRAINING.replace(embedding_dim=2, top_k=3, **changes)
    model = Recommender(num_users=4, num_movies=6, movie_counts=counts, config=config)
    model.build_for_ids()
    users = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float32)
    movies = np.array([[0, 0], [3, 0], [0, 2], [1, 1], [9, 9], [-1, 0]], np.float32)
    model.user_embedding.embeddings.assign(users)
    model.movie_embedding.embeddings.assign(movies)
    model.index_candidates()
    return model, users, movies, counts


def _softmax_ce(logits, labels):
    logits = logits - logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -(labels * log_softmax).sum(axis=1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_retrieval_loss_matches_hand_computation(reduction):
    model, users, movies, counts = _tiny_model(
        temperature=0.5,
        sampling_correction_weight=1.5,
        remove_accidental_hits=True,
        retrieval_loss_reduction=reduction,
    )
    user_ids = np.array([1, 2, 3], np.int32)
    movie_ids = np.array([1, 2, 1], np.int32)  # movie 1 twice: an accidental hit for rows 0 and 2
    out = model({F.USER_ID: tf.constant(user_ids), F.MOVIE_ID: tf.constant(movie_ids)})
    loss = float(model._retrieval_loss(tf.constant(movie_ids), out))

    logits = users[user_ids] @ movies[movie_ids].T / 0.5
    log_q = np.log(np.clip(counts / counts.sum(), 1e-9, 1.0))[movie_ids]
    logits = logits - 1.5 * log_q[None, :]
    labels = np.eye(3)
    same = movie_ids[:, None] == movie_ids[None, :]
    logits = np.where(same & (labels == 0), -1e9, logits)
    per_row = _softmax_ce(logits, labels)
    expected = per_row.sum() if reduction == "sum" else per_row.mean()
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("l2", [0.0, 0.01])
def test_total_loss_is_the_weighted_sum(l2):
    model, users, movies, _ = _tiny_model(
        retrieval_weight=2.0, ranking_weight=3.0, temperature=1.0, embedding_l2=l2
    )
    x = {F.USER_ID: tf.constant([1, 2], tf.int32), F.MOVIE_ID: tf.constant([1, 2], tf.int32)}
    y = tf.constant([0.25, 1.0])
    out = model(x)
    retrieval = float(model._retrieval_loss(x[F.MOVIE_ID], out))
    mse = float(np.mean((y.numpy() - out[F.RATING].numpy()) ** 2))
    total = float(model.compute_loss(x, y, out))
    penalty = l2 * (np.square(users).sum() + np.square(movies).sum())
    assert total == pytest.approx(2.0 * retrieval + 3.0 * mse + penalty, rel=1e-5)


def test_recommend_skips_padding_non_candidates_and_seen():
    model, *_ = _tiny_model()
    # user 3 = [1, 1]: scores movie1=3, movie2=2, movie3=2, movie5=-1; movie 4 (18) is no candidate
    scores, ids = model.recommend(tf.constant([3], tf.int32))
    assert ids.numpy().tolist() == [[1, 2, 3]] or ids.numpy().tolist() == [[1, 3, 2]]
    seen = SeenMovies(np.array([3, 3]), np.array([1, 4]), model.num_users)
    _, ids = model.recommend(tf.constant([3], tf.int32), seen=seen)
    assert sorted(ids.numpy()[0].tolist()) == [2, 3, 5]
    # Excluding more than the catalogue leaves -1 padding, never id 0 or a seen movie.
    _, ids = model.recommend(
        tf.constant([3], tf.int32), excluded_movie_ids=tf.constant([[1, 2, 0]], tf.int32)
    )
    assert ids.numpy().tolist() == [[3, 5, NO_MOVIE]]


def test_rating_is_clipped_to_unit_interval():
    model, *_ = _tiny_model()
    rating = model.predict_rating(tf.constant([1, 2, 3]), tf.constant([1, 2, 3])).numpy()
    assert ((rating >= 0) & (rating <= 1)).all()


def test_artifact_round_trip(tmp_path, small_model):
    small_model.save_artifact(str(tmp_path))
    loaded = Recommender.load_artifact(str(tmp_path))
    users = tf.constant([1, 2, 3, 4], tf.int32)
    movies = tf.constant([1, 5, 7, 9], tf.int32)
    np.testing.assert_allclose(
        loaded.predict_rating(users, movies).numpy(),
        small_model.predict_rating(users, movies).numpy(),
    )
    np.testing.assert_array_equal(
        loaded.recommend(users)[1].numpy(), small_model.recommend(users)[1].numpy()
    )
    assert loaded.config == small_model.config


def test_seen_movies_rejects_unknown_users():
    with pytest.raises(ValueError, match="user ids must be in"):
        SeenMovies(np.array([5]), np.array([1]), num_users=3)
