import keras
import numpy as np
import pytest
import tensorflow as tf

from components import features as F
from components.config import DEFAULT_TRAINING
from components.training.fused_head import FusedRatingHead
from components.training.layers import NO_MOVIE, AveragedHeads
from components.training.model import Recommender
from components.training.seen_movies import SeenMovies
from components.training.side_features import (
    AGE_EDGES,
    NUM_GENRES,
    YEAR_EDGES,
    movie_features,
    user_features,
)


def _tiny_model(**changes):
    counts = np.array([0, 5, 3, 2, 0, 1])  # movie 4 never rated in training: not a candidate
    # Hand computations below assume in-batch negatives and retrieval order unless told.
    changes = {
        "retrieval_negatives": "in-batch",
        "sampled_negatives": 0,
        "disliked_retrieval_weight": 1.0,
        "rerank_pool": 0,
        **changes,
    }
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


def test_exclusion_masks_match_a_reference_for_a_batch_of_users():
    """Several users at once, repeated, one with nothing seen, one whose rows end a split;
    padding, unknown and non-candidate ids excluded nowhere."""
    model, *_ = _tiny_model()
    seen = SeenMovies(np.array([0, 1, 1, 3, 3, 3]), np.array([2, 1, 5, 1, 3, 4]), 4)
    users = np.array([3, 2, 1, 3, 0], np.int32)  # user 2 rated nothing
    rated = {0: [2], 1: [1, 5], 2: [], 3: [1, 3, 4]}
    candidates = model.candidate_ids.tolist()

    def reference(lists):
        mask = np.zeros((len(lists), len(candidates)), bool)
        for row, movies in enumerate(lists):
            for movie in movies:
                if movie in candidates:
                    mask[row, candidates.index(movie)] = True
        return mask

    got = model.seen_mask(tf.constant(users), seen).numpy()
    np.testing.assert_array_equal(got, reference([rated[u] for u in users]))
    excluded = np.array([[5, 0, 0], [4, 99, -1], [1, 2, 3]], np.int32)  # 4: no candidate
    got = model.ids_mask(tf.constant(excluded)).numpy()
    np.testing.assert_array_equal(got, reference(excluded.tolist()))


def test_rating_is_clipped_to_unit_interval():
    """A head pushed far outside [0, 1] (large biases) still predicts within it."""
    model, *_ = _tiny_model()
    model.user_bias.embeddings.assign(tf.constant([[0.0], [5.0], [-5.0], [0.0]]))
    rating = model.predict_rating(tf.constant([1, 2, 3]), tf.constant([1, 2, 3])).numpy()
    assert rating[0] == 1.0 and rating[1] == 0.0
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


def _pair_inputs(user_ids, movie_ids):
    return {
        F.USER_ID: tf.constant(user_ids, tf.int32),
        F.MOVIE_ID: tf.constant(movie_ids, tf.int32),
    }


def test_full_softmax_loss_is_cross_entropy_over_all_candidates():
    model, users, movies, _ = _tiny_model(retrieval_negatives="full", temperature=0.5)
    user_ids, movie_ids = np.array([1, 3]), np.array([2, 5])
    out = model(_pair_inputs(user_ids, movie_ids))
    loss = float(model._retrieval_loss(tf.constant(movie_ids, tf.int32), out))
    candidates = np.array([1, 2, 3, 5])  # movie 0 is padding, movie 4 has no training rating
    logits = users[user_ids] @ movies[candidates].T / 0.5
    labels = (candidates[None, :] == movie_ids[:, None]).astype(float)
    assert loss == pytest.approx(_softmax_ce(logits, labels).mean(), rel=1e-5)


def test_full_softmax_loss_skips_movies_that_are_no_candidates():
    """Validation rows may hold a movie rated only outside train (no candidate): no crash,
    and such a row adds nothing."""
    model, users, movies, _ = _tiny_model(retrieval_negatives="full", temperature=0.5)
    out = model(_pair_inputs(np.array([1, 3]), np.array([2, 4])))
    per_row = model._full_softmax_loss(out["user_embedding"], tf.constant([2, 4], tf.int32))
    candidates = np.array([1, 2, 3, 5])
    logits = users[[1]] @ movies[candidates].T / 0.5
    expected = _softmax_ce(logits, (candidates == 2)[None, :].astype(float))[0]
    assert per_row.numpy() == pytest.approx([expected, 0.0], rel=1e-5)


def test_mixed_negatives_loss_matches_hand_computation(monkeypatch):
    model, users, movies, counts = _tiny_model(
        retrieval_negatives="mixed",
        sampled_negatives=2,
        temperature=0.5,
        sampling_correction_weight=1.0,
        disliked_retrieval_weight=0.25,
    )
    monkeypatch.setattr(model, "_sample_negative_ids", lambda: tf.constant([3, 2], tf.int32))
    user_ids, movie_ids = np.array([1, 2]), np.array([2, 1])
    ratings = np.array([1.0, 0.5])  # the second is below "liked" (0.75): weight 0.25
    out = model(_pair_inputs(user_ids, movie_ids))
    loss = float(model._retrieval_loss(tf.constant(movie_ids, tf.int32), out, tf.constant(ratings)))
    columns = np.array([2, 1, 3, 2])  # the batch's movies, then the uniform samples
    logits = users[user_ids] @ movies[columns].T / 0.5
    # Expected count of each column among the negatives: batch * p(popularity) + samples / N.
    expected = 2 * counts[columns] / counts.sum() + 2 / 4
    logits = logits - np.log(expected)[None, :]
    labels = np.zeros((2, 4))
    labels[[0, 1], [0, 1]] = 1
    # Row 0's positive (movie 2) is sampled again at column 3: an accidental hit, masked.
    logits[0, 3] = -1e9
    per_row = _softmax_ce(logits, labels)
    weights = np.array([1.0, 0.25])
    assert loss == pytest.approx((weights * per_row).sum() / weights.sum(), rel=1e-5)


def _history_model(pooling):
    counts = np.array([0, 2, 1, 1])
    config = DEFAULT_TRAINING.replace(embedding_dim=2, top_k=2, user_history_pooling=pooling)
    history = (np.array([1, 1, 1, 2]), np.array([1, 2, 3, 1]))  # user 1 rated 1, 2, 3
    model = Recommender(3, 4, counts, config, user_history=history)
    model.build_for_ids()
    model.user_embedding.embeddings.assign(np.array([[0, 0], [1, 0], [0, 1]], np.float32))
    model.history_embedding.embeddings.assign(
        np.array([[0, 0], [1, 1], [2, 0], [0, 4]], np.float32)
    )
    return model


@pytest.mark.parametrize("pooling", ["mean", "sqrtn"])
def test_history_pooling_leaves_out_the_training_movie(pooling):
    model = _history_model(pooling)
    scale = (lambda n: n) if pooling == "mean" else np.sqrt
    # Inference: user 1 pools movies 1, 2, 3 = [3, 5]; user 2 movie 1; user 0 has no history.
    pooled = model.user_vector(tf.constant([1, 2, 0], tf.int32)).numpy()
    np.testing.assert_allclose(
        pooled, [[1 + 3 / scale(3), 5 / scale(3)], [1, 2], [0, 0]], atol=1e-6
    )
    # Training pairs (1, 2), (1, 3): pool the other two movies; (2, 1): nothing left.
    left_out = model.user_vector(
        tf.constant([1, 1, 2], tf.int32), tf.constant([2, 3, 1], tf.int32)
    ).numpy()
    np.testing.assert_allclose(
        left_out,
        [[1 + 1 / scale(2), 5 / scale(2)], [1 + 3 / scale(2), 1 / scale(2)], [0, 1]],
        atol=1e-6,
    )


def test_history_model_needs_history_and_round_trips(tmp_path):
    with pytest.raises(ValueError, match="needs user_history"):
        Recommender(
            3, 4, np.array([0, 2, 1, 1]), DEFAULT_TRAINING.replace(user_history_pooling="mean")
        )
    model = _history_model("sqrtn")
    model.index_candidates()
    model.save_artifact(str(tmp_path))
    loaded = Recommender.load_artifact(str(tmp_path))
    users = tf.constant([1, 2], tf.int32)
    np.testing.assert_allclose(
        loaded.user_vector(users).numpy(), model.user_vector(users).numpy(), atol=1e-6
    )


def test_cosine_schedule_decays_to_the_final_fraction():
    counts = np.array([0, 600, 400])  # 1000 training rows: 4 steps per epoch at batch 256
    config = DEFAULT_TRAINING.replace(
        learning_rate_schedule="cosine",
        learning_rate=0.01,
        final_learning_rate_fraction=0.1,
        batch_size=256,
        epochs=2,
    )
    model = Recommender(3, 3, counts, config)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate))
    schedule = model.optimizer._learning_rate
    assert float(schedule(0)) == pytest.approx(0.01)
    assert float(schedule(8)) == pytest.approx(0.001)
    assert float(schedule(4)) == pytest.approx(0.001 + 0.009 * 0.5)


def test_side_feature_loaders_one_hot_encode():
    item = "2|GoldenEye (1995)|01-Jan-1995||http://x|" + "|".join(["0", "1"] + ["0"] * 17) + "\n"
    movies = movie_features([item, "bad line\n"], num_movies=4)
    assert movies.shape == (4, NUM_GENRES + len(YEAR_EDGES) + 1)
    assert movies[2, 1] == 1.0 and movies[2, :NUM_GENRES].sum() == 1.0
    assert movies[2, NUM_GENRES + np.digitize(1995, YEAR_EDGES)] == 1.0
    assert movies[[0, 1, 3]].sum() == 0.0  # padding and movies absent from u.item: zeros
    users = user_features(["1|24|M|writer|85711\n", "2|x|?|none|0\n"], ["artist", "writer"], 3)
    # age 24 -> bucket 1 (18..24), "M" -> first gender slot, "writer" -> second occupation.
    np.testing.assert_array_equal(np.flatnonzero(users[1]), [1, len(AGE_EDGES) + 1, 10])
    assert users[2].sum() == 0.0


def test_side_features_enter_both_towers(tmp_path):
    user_table = np.eye(4, 2, dtype=np.float32)  # user 0 -> [1, 0], user 1 -> [0, 1]
    movie_table = np.ones((6, 3), np.float32)
    model, users, movies, counts = _tiny_model(use_side_features=False)
    config = model.config.replace(use_side_features=True)
    with pytest.raises(ValueError, match="needs user_features"):
        Recommender(4, 6, counts, config)
    model = Recommender(4, 6, counts, config, user_features=user_table, movie_features=movie_table)
    model.build_for_ids()
    user_projection = np.array([[2.0, 0.0], [0.0, 3.0]], np.float32)
    movie_projection = np.full((3, 2), 0.5, np.float32)
    model.user_feature_projection.kernel.assign(user_projection)
    model.movie_feature_projection.kernel.assign(movie_projection)
    ids = tf.constant([1, 2], tf.int32)
    np.testing.assert_allclose(
        model.user_vector(ids).numpy(),
        model.user_embedding(ids).numpy() + user_table[[1, 2]] @ user_projection,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        model.movie_vector(ids).numpy(), model.movie_embedding(ids).numpy() + 1.5, atol=1e-6
    )
    model.index_candidates()
    model.save_artifact(str(tmp_path))
    loaded = Recommender.load_artifact(str(tmp_path))
    np.testing.assert_allclose(
        loaded.predict_rating(ids, ids).numpy(), model.predict_rating(ids, ids).numpy(), atol=1e-6
    )


def test_rerank_reorders_the_pool_by_logit_plus_rating():
    model, users, movies, _ = _tiny_model(
        rerank_pool=2, rerank_rating_weight=100.0, temperature=1.0
    )
    user = tf.constant([3], tf.int32)
    # Retrieval for user 3 = [1, 1]: movie 1 (3) first, then movies 2 and 3 (2 each).
    _, retrieved = _tiny_model(temperature=1.0)[0].recommend(user, k=3)
    scores, ids = model.recommend(user, k=3)
    ratings = model.predict_rating(tf.constant([3, 3, 3]), retrieved[0]).numpy()
    logits = users[3] @ movies[retrieved.numpy()[0]].T
    combined = logits + 100.0 * ratings
    head = np.argsort(-combined[:2], kind="stable")
    np.testing.assert_array_equal(ids.numpy()[0, :2], retrieved.numpy()[0, head])
    assert ids.numpy()[0, 2] == retrieved.numpy()[0, 2]  # beyond the pool: retrieval order
    np.testing.assert_allclose(scores.numpy()[0, :2], combined[head], rtol=1e-5)
    # k beyond the pool, and a fully excluded catalogue still pads with NO_MOVIE.
    _, ids = model.recommend(user, k=4, excluded_movie_ids=tf.constant([[1, 2, 3, 5]], tf.int32))
    assert ids.numpy().tolist() == [[NO_MOVIE] * 4]


def test_rating_heads_are_averaged_and_round_trip(tmp_path):
    model, *_ = _tiny_model(rating_heads=3, rating_hidden_units=(4,))
    head = model.rating_head
    assert isinstance(head, AveragedHeads) and not model.extra_rating_heads
    assert len(head.trainable_weights) == 4  # however many heads
    kernel, bias = head.kernel.numpy(), head.bias.numpy()
    out_kernel, out_bias = head.out_kernel.numpy(), float(head.out_bias.numpy())
    blocks = [slice(4 * i, 4 * (i + 1)) for i in range(3)]
    # Each head starts as its own Dense(4) / Dense(1) would: Glorot over its own fans, and
    # from different values.
    assert np.abs(kernel).max() <= np.sqrt(6 / (4 + 4)) and np.abs(out_kernel).max() <= np.sqrt(
        6 / 5
    )
    assert not np.allclose(kernel[:, blocks[0]], kernel[:, blocks[1]])
    model.user_bias.embeddings.assign(np.arange(4, dtype=np.float32)[:, None] / 10)
    users, movies = tf.constant([1, 2], tf.int32), tf.constant([3, 1], tf.int32)
    inputs = tf.concat([model.user_embedding(users), model.movie_embedding(movies)], axis=-1)
    heads = [
        np.maximum(inputs.numpy() @ kernel[:, b] + bias[b], 0) @ out_kernel[b, 0] + out_bias
        for b in blocks
    ]
    biases = (model.user_bias(users)[:, 0] + model.movie_bias(movies)[:, 0]).numpy()
    user, movie = model.user_vector(users), model.movie_vector(movies)
    np.testing.assert_allclose(
        model._rating(users, movies, user, movie).numpy(),
        np.mean(heads, axis=0) + biases,
        atol=1e-6,
    )
    model.save_artifact(str(tmp_path))
    loaded = Recommender.load_artifact(str(tmp_path))
    np.testing.assert_allclose(
        loaded.predict_rating(users, movies).numpy(),
        model.predict_rating(users, movies).numpy(),
        atol=1e-6,
    )


@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize(
    "extras", [{}, {"rating_product_feature": True, "rating_embedding_dim": 2}]
)
def test_fused_rating_head_equals_the_heads(table, extras):
    model, *_ = _tiny_model(rating_heads=3, rating_hidden_units=(8,), rerank_pool=3, **extras)
    rng = np.random.default_rng(0)
    model.user_bias.embeddings.assign(rng.normal(size=(4, 1)).astype(np.float32))
    model.movie_bias.embeddings.assign(rng.normal(size=(6, 1)).astype(np.float32))
    model.index_candidates()
    if not table:  # a catalogue over the table limit: the movie block is multiplied per call
        model.fused_rating_head = FusedRatingHead(model, max_table_bytes=0)
    assert (model.fused_rating_head.movie_table is not None) == table
    users = tf.constant([1, 2, 3], tf.int32)
    movies = tf.constant([[3, 1], [2, 5], [0, 3]], tf.int32)  # 2 per user, padding included
    flat_users, flat_movies = tf.repeat(users, 2), tf.reshape(movies, [-1])
    user, movie = model.user_vector(flat_users), model.movie_vector(flat_movies)
    expected = model._rating(flat_users, flat_movies, user, movie).numpy()
    fused = model.fused_rating_head(model, users, flat_movies, model.user_vector(users), 2)
    np.testing.assert_allclose(fused.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(
        model.predict_rating(flat_users, flat_movies).numpy(), np.clip(expected, 0, 1), atol=1e-5
    )
    # Recommendations (re-ranked by rating) are those of the heads themselves.
    scores, ids = model.recommend(users, k=3)
    model.fused_rating_head = None
    unfused_scores, unfused_ids = model.recommend(users, k=3)
    np.testing.assert_array_equal(ids.numpy(), unfused_ids.numpy())
    np.testing.assert_allclose(scores.numpy(), unfused_scores.numpy(), atol=1e-4)


def test_rating_input_dropout_acts_in_training_only():
    model, *_ = _tiny_model(rating_input_dropout=0.5)
    users, movies = tf.constant([1, 2, 3] * 20, tf.int32), tf.constant([1, 2, 3] * 20, tf.int32)
    user, movie = model.user_vector(users), model.movie_vector(movies)
    inference = model._rating(users, movies, user, movie).numpy()
    np.testing.assert_allclose(inference, model._rating(users, movies, user, movie).numpy())
    trained = model._rating(users, movies, user, movie, training=True).numpy()
    assert not np.allclose(trained, inference)


def test_ema_swaps_the_weight_average_in_at_the_end_of_fit():
    from components.training.trainer import make_optimizer

    config = DEFAULT_TRAINING.replace(
        embedding_dim=2,
        ema_momentum=0.9,
        epochs=2,
        batch_size=4,
        rerank_pool=0,
        retrieval_negatives="in-batch",
        sampled_negatives=0,
    )
    optimizer = make_optimizer(config)
    assert optimizer.use_ema and optimizer.ema_momentum == pytest.approx(0.9)
    counts = np.array([0, 4, 4, 4])
    model = Recommender(3, 4, counts, config)
    model.build_for_ids()
    model.compile(optimizer=optimizer)
    assert model.optimizer.use_ema  # kept when compile installs the schedule
    x = {F.USER_ID: np.array([1, 2] * 6, np.int32), F.MOVIE_ID: np.array([1, 2, 3] * 4, np.int32)}
    y = np.linspace(0, 1, 12).astype(np.float32)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    averages = model.optimizer._model_variables_moving_average
    for variable, average in zip(model.trainable_variables, averages, strict=True):
        np.testing.assert_allclose(variable.numpy(), average.numpy())
    assert not make_optimizer(config.replace(ema_momentum=0.0)).use_ema


@pytest.mark.parametrize(
    "changes",
    [{"rating_heads": 0}, {"rating_input_dropout": 1.0}, {"ema_momentum": 1.0}],
)
def test_rating_and_averaging_settings_are_validated(changes):
    from components.config import ConfigError

    with pytest.raises(ConfigError):
        DEFAULT_TRAINING.replace(**changes)


def _masked_reference_loss(model, user_ids, movie_ids, sampled_ids=None):
    """The in-batch / mixed retrieval loss as one column per batch row (and per sample), the
    accidental hits masked out: the formulation the deduplicated columns must equal."""
    config = model.config
    query = model.user_vector(user_ids) / config.temperature
    movie = model.movie_vector(movie_ids)
    column_ids, columns = movie_ids, movie
    if sampled_ids is not None:
        column_ids = tf.concat([movie_ids, sampled_ids], 0)
        columns = tf.concat([movie, model.movie_vector(sampled_ids)], 0)
    batch = tf.shape(movie_ids)[0]
    correction = config.sampling_correction_weight * model._log_q(column_ids, batch)
    logits = tf.matmul(query, columns, transpose_b=True) - correction[None, :]
    positive = tf.reduce_sum(query * movie, 1) - correction[:batch]
    if not config.remove_accidental_hits:
        return tf.reduce_mean(tf.reduce_logsumexp(logits, 1) - positive)
    same = tf.equal(movie_ids[:, None], column_ids[None, :])
    others = tf.reduce_logsumexp(tf.where(same, -1e9, logits), 1)
    return tf.reduce_mean(tf.math.reduce_logsumexp(tf.stack([others, positive]), 0) - positive)


@pytest.mark.parametrize("negatives", ["in-batch", "mixed"])
@pytest.mark.parametrize("remove_hits", [True, False])
def test_deduplicated_columns_equal_one_column_per_row(negatives, remove_hits):
    """Loss and gradients of every table: repeated movies as one column weighted by its count
    equal one column per batch row (and per sampled movie)."""
    rng = np.random.default_rng(3)
    counts = np.concatenate([[0], rng.integers(1, 50, 12)])
    config = DEFAULT_TRAINING.replace(
        embedding_dim=4,
        retrieval_negatives=negatives,
        sampled_negatives=5 if negatives == "mixed" else 0,
        remove_accidental_hits=remove_hits,
        disliked_retrieval_weight=1.0,
        temperature=0.2,
    )
    model = Recommender(num_users=9, num_movies=13, movie_counts=counts, config=config)
    model.build_for_ids()
    user_ids = tf.constant(rng.integers(1, 9, 40), tf.int32)
    movie_ids = tf.constant(rng.choice([1, 2, 2, 3, 3, 3, 7, 12], 40), tf.int32)  # many repeats
    sampled = tf.constant([2, 5, 5, 12, 9], tf.int32) if negatives == "mixed" else None
    if sampled is not None:
        model._sample_negative_ids = lambda: sampled
    tables = [model.user_embedding.embeddings, model.movie_embedding.embeddings]
    with tf.GradientTape(persistent=True) as tape:
        out = model({F.USER_ID: user_ids, F.MOVIE_ID: movie_ids}, training=True)
        loss = model._retrieval_loss(movie_ids, out)
        reference = _masked_reference_loss(model, user_ids, movie_ids, sampled)
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    for got, want in zip(
        tape.gradient(loss, tables), tape.gradient(reference, tables), strict=True
    ):
        np.testing.assert_allclose(
            tf.convert_to_tensor(got).numpy(), tf.convert_to_tensor(want).numpy(), atol=2e-5
        )


def test_lazy_embedding_updates_touch_only_the_batch_rows():
    """With lazy_embedding_updates the tables carry no regularizer (their L2 is the
    optimizer's, row-wise), the optimizer is LazyAdam, and a step moves only the rows looked up."""
    from components.training.optimizers import LazyAdam

    counts = np.array([0, 5, 3, 2, 1, 1])
    config = DEFAULT_TRAINING.replace(
        embedding_dim=4, lazy_embedding_updates=True, embedding_l2=0.01, bias_l2=0.02,
        retrieval_negatives="in-batch", sampled_negatives=0,
    )  # fmt: skip
    model = Recommender(num_users=7, num_movies=6, movie_counts=counts, config=config)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    assert isinstance(model.optimizer, LazyAdam)
    assert model.optimizer.row_l2 == {
        model.user_embedding.embeddings.path: 0.01,
        model.movie_embedding.embeddings.path: 0.01,
        model.user_bias.embeddings.path: 0.02,
        model.movie_bias.embeddings.path: 0.02,
    }
    assert not model.losses  # no whole-table penalty
    before = {
        t.path: t.numpy().copy()
        for t in (model.user_embedding.embeddings, model.movie_embedding.embeddings)
    }
    x = {F.USER_ID: tf.constant([1, 2, 2], tf.int32), F.MOVIE_ID: tf.constant([3, 1, 3], tf.int32)}
    model.train_on_batch(x, tf.constant([1.0, 0.5, 0.25]))
    users = model.user_embedding.embeddings.numpy()
    movies = model.movie_embedding.embeddings.numpy()
    old_users = before[model.user_embedding.embeddings.path]
    old_movies = before[model.movie_embedding.embeddings.path]
    np.testing.assert_array_equal(users[[0, 3, 4, 5, 6]], old_users[[0, 3, 4, 5, 6]])
    np.testing.assert_array_equal(movies[[0, 2, 4, 5]], old_movies[[0, 2, 4, 5]])
    assert (users[[1, 2]] != old_users[[1, 2]]).all()
    assert (movies[[1, 3]] != old_movies[[1, 3]]).all()


def test_lazy_embedding_updates_refuse_weight_decay():
    from components.config import ConfigError

    with pytest.raises(ConfigError, match="weight_decay"):
        DEFAULT_TRAINING.replace(lazy_embedding_updates=True, weight_decay=1e-4)
