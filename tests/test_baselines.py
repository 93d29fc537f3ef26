"""Baselines on small synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from components.evaluation import baselines
from components.evaluation.baselines import (
    EASE,
    BiasModel,
    choose_by_validation,
    ease_skip_reason,
    global_mean_predict,
    popularity_ranking,
    popularity_top_k,
)

# Counts: movie 3 x4, movie 1 x3, movie 2 x3, movie 5 x1 (movie 4 never rated).
TRAIN_USERS = np.array([1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4])
TRAIN_MOVIES = np.array([3, 1, 2, 3, 5, 3, 1, 2, 3, 1, 2])


def test_popularity_ranking_ties_by_lower_id() -> None:
    np.testing.assert_array_equal(popularity_ranking(TRAIN_MOVIES), [3, 1, 2, 5])


def test_popularity_including_seen() -> None:
    top = popularity_top_k(TRAIN_USERS, TRAIN_MOVIES, num_rows=6, k=3, exclude_seen=False)
    assert top.shape == (6, 3)
    np.testing.assert_array_equal(top, np.tile([3, 1, 2], (6, 1)))


def test_popularity_excluding_seen_hand_example() -> None:
    top = popularity_top_k(TRAIN_USERS, TRAIN_MOVIES, num_rows=6, k=3)
    expected = np.array(
        [
            [3, 1, 2],  # row 0: no training ratings
            [5, 0, 0],  # user 1 saw 3, 1, 2: only 5 left, pad with 0
            [1, 2, 0],  # user 2 saw 3, 5
            [5, 0, 0],
            [5, 0, 0],
            [3, 1, 2],  # user 5: no training ratings
        ]
    )
    np.testing.assert_array_equal(top, expected)


def test_popularity_never_recommends_padding_or_unrated() -> None:
    users = np.array([1, 1, 2, 2, 2])
    movies = np.array([0, 7, 0, 0, 8])  # padding id 0 is the most "rated"
    top = popularity_top_k(users, movies, num_rows=3, k=2, exclude_seen=False)
    np.testing.assert_array_equal(top, [[7, 8]] * 3)
    top = popularity_top_k(users, movies, num_rows=3, k=2)
    np.testing.assert_array_equal(top, [[7, 8], [8, 0], [7, 0]])


def test_popularity_chunked_matches_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    users = rng.integers(1, 200, size=5_000)
    movies = np.minimum(rng.zipf(1.3, size=5_000), 300)
    full = popularity_top_k(users, movies, num_rows=210, k=10)
    monkeypatch.setattr(baselines, "_CHUNK_CELLS", 50)
    chunked = popularity_top_k(users, movies, num_rows=210, k=10)
    np.testing.assert_array_equal(full, chunked)
    # Reference by brute force.
    ranking = popularity_ranking(movies)
    for u in range(210):
        seen = set(movies[users == u].tolist())
        ref = [m for m in ranking if m not in seen][:10]
        ref += [0] * (10 - len(ref))
        np.testing.assert_array_equal(full[u], ref)


def test_popularity_at_ml100k_size() -> None:
    """Shape and no padding at ML-100k's size (its speed is bench/baselines.py's business)."""
    rng = np.random.default_rng(2)
    users = rng.integers(1, 944, size=80_000)
    movies = rng.integers(1, 1683, size=80_000)
    top = popularity_top_k(users, movies, num_rows=944, k=10)
    assert top.shape == (944, 10)
    assert not np.any(top[1:] == 0)


def test_global_mean() -> None:
    np.testing.assert_allclose(global_mean_predict(np.array([0.0, 0.5, 1.0, 0.5]), 3), [0.5] * 3)
    with pytest.raises(ValueError):
        global_mean_predict(np.array([]), 2)


def test_bias_model_recovers_additive_ratings() -> None:
    rng = np.random.default_rng(3)
    user_b = rng.normal(0, 0.5, size=30)
    item_b = rng.normal(0, 0.5, size=40)
    uu, mm = np.meshgrid(np.arange(1, 30), np.arange(1, 40), indexing="ij")
    users, movies = uu.ravel(), mm.ravel()
    keep = rng.random(users.size) < 0.7  # incomplete matrix
    users, movies = users[keep], movies[keep]
    ratings = 3.0 + user_b[users] + item_b[movies]
    model = BiasModel(user_reg=1e-9, item_reg=1e-9, n_sweeps=200, clip_min=None, clip_max=None)
    model.fit(users, movies, ratings)
    np.testing.assert_allclose(model.predict(users, movies), ratings, atol=1e-6)
    # Biases are only identified up to a shift between users and items; differences are exact.
    np.testing.assert_allclose(np.diff(model.user_bias[1:]), np.diff(user_b[1:]), atol=1e-6)


def test_bias_model_unknown_ids_and_clipping() -> None:
    users = np.array([1, 1, 2, 2])
    movies = np.array([1, 2, 1, 2])
    ratings = np.array([1.0, 0.75, 0.5, 0.25])
    model = BiasModel(user_reg=0.0, item_reg=0.0).fit(users, movies, ratings)
    pred = model.predict(np.array([99, -1, 1]), np.array([99, 1, 77]))
    assert pred[0] == pytest.approx(model.mu)
    assert pred[1] == pytest.approx(model.mu + model.item_bias[1])
    assert pred[2] == pytest.approx(model.mu + model.user_bias[1])
    wide = BiasModel(user_reg=0.0, item_reg=0.0, clip_min=None, clip_max=None)
    raw = wide.fit(users, movies, ratings * 10).predict(users, movies)
    clipped = BiasModel(user_reg=0.0, item_reg=0.0, clip_min=0.0, clip_max=5.0)
    capped = clipped.fit(users, movies, ratings * 10).predict(users, movies)
    np.testing.assert_allclose(capped, np.clip(raw, 0.0, 5.0))
    assert capped.max() == 5.0


def test_bias_model_regularisation_shrinks() -> None:
    users = np.array([1, 2, 2, 2])
    movies = np.array([1, 1, 2, 3])
    ratings = np.array([1.0, 0.0, 0.0, 0.0])
    loose = BiasModel(user_reg=0.0, item_reg=0.0).fit(users, movies, ratings)
    tight = BiasModel(user_reg=100.0, item_reg=100.0).fit(users, movies, ratings)
    assert abs(tight.user_bias[1]) < abs(loose.user_bias[1])
    assert np.all(np.abs(tight.predict(users, movies) - tight.mu) < 0.02)


# EASE hand example: user 1 rated movies {1, 2}, user 2 movie {1}; lambda = 1.
# G + I over movies (1, 2) = [[3, 1], [1, 2]], P = [[2, -1], [-1, 3]] / 5,
# B[i, j] = -P[i, j] / P[j, j]: B[1, 2] = 1/3, B[2, 1] = 1/2.
EASE_USERS = np.array([1, 1, 2])
EASE_MOVIES = np.array([1, 2, 1])


def test_ease_weights_hand_values() -> None:
    ease = EASE(lam=1.0).fit(EASE_USERS, EASE_MOVIES, num_rows=3, num_items=3)
    np.testing.assert_allclose(ease.weights[1:, 1:], [[0.0, 1 / 3], [1 / 2, 0.0]], atol=1e-12)
    np.testing.assert_allclose(ease.weights[0], 0.0, atol=1e-12)  # padding column: no weight


def test_ease_lambda_grid_matches_direct_inverse() -> None:
    rng = np.random.default_rng(0)
    users, movies = rng.integers(1, 30, 300), rng.integers(1, 25, 300)
    ease = EASE().fit(users, movies, num_rows=30, num_items=25)
    x = np.zeros((30, 25))
    x[users, movies] = 1.0
    for lam in (5.0, 50.0):
        p = np.linalg.inv(x.T @ x + lam * np.eye(25))
        b = -p / np.diag(p)
        np.fill_diagonal(b, 0.0)
        np.testing.assert_allclose(ease.set_lambda(lam).weights, b, atol=1e-8)


def test_ease_top_k_excludes_seen_padding_and_given_pairs() -> None:
    ease = EASE(lam=1.0).fit(EASE_USERS, EASE_MOVIES, num_rows=3, num_items=3)
    top = ease.top_k(2)
    # user 2 saw movie 1: movie 2 (score 1/3), then nothing left (padding fill); user 1 saw all;
    # row 0 has no history: all scores 0, ties by lower id.
    np.testing.assert_array_equal(top, [[1, 2], [0, 0], [2, 0]])
    np.testing.assert_array_equal(ease.top_k(2, np.array([2]), np.array([2]))[2], [0, 0])


def test_choose_by_validation_prefers_larger_on_ties() -> None:
    assert choose_by_validation({100.0: 0.2, 500.0: 0.3, 800.0: 0.3, 1200.0: 0.25}) == 800.0
    with pytest.raises(ValueError):
        choose_by_validation({})


def test_ease_skipped_above_item_limit() -> None:
    assert ease_skip_reason(100, max_items=100) is None
    reason = ease_skip_reason(101, max_items=100)
    assert reason is not None and "101" in reason
    with pytest.raises(ValueError, match="EASE skipped"):
        EASE(max_items=2).fit(EASE_USERS, EASE_MOVIES, num_rows=3, num_items=3)
