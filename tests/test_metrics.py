"""Metrics against hand-computed values on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.evaluation.metrics import (
    bucket_by_edges,
    bucket_labels,
    coverage_at_k,
    hit_rate_curve,
    ndcg_at_k,
    novelty_at_k,
    popularity_buckets,
    rank_positions,
    recall_at_k,
    rmse,
    sliced_topk_metrics,
)

# Row 0 is padding (no user 0); user 3 has a padded slot (movie 0) at rank 3.
TOP = np.array(
    [
        [0, 0, 0],
        [10, 20, 30],
        [20, 40, 50],
        [30, 10, 0],
    ]
)


def test_rmse() -> None:
    assert rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])) == pytest.approx(
        math.sqrt(4 / 3)
    )
    assert rmse(np.zeros(4), np.zeros(4)) == 0.0
    with pytest.raises(ValueError):
        rmse(np.zeros(2), np.zeros(3))


def test_rank_positions() -> None:
    users = np.array([1, 1, 1, 2, 3, 3, 0, 7, 3])
    movies = np.array([10, 30, 40, 50, 10, 0, 0, 10, 20])
    # user 3 movie 0: padding never found; user 0: padding row; user 7: outside top_ids.
    np.testing.assert_array_equal(rank_positions(TOP, users, movies), [0, 2, 3, 2, 1, 3, 3, 3, 3])


def test_hit_rate_curve_hand_values() -> None:
    users = np.array([1, 1, 2, 2, 3, 3, 3])
    movies = np.array([20, 40, 20, 50, 10, 0, 30])
    stars = np.array([5.0, 5.0, 5.0, 4.0, 5.0, 5.0, 3.0])
    # 5-star rows: (1,20) rank 1, (1,40) absent, (2,20) rank 0, (3,10) rank 1, (3,0) padding.
    curve = hit_rate_curve(TOP, users, movies, stars)
    np.testing.assert_allclose(curve, [1 / 5, 3 / 5, 3 / 5])
    # Threshold 4 adds (2,50) at rank 2.
    np.testing.assert_allclose(
        hit_rate_curve(TOP, users, movies, stars, min_stars=4.0, max_k=3), [1 / 6, 3 / 6, 4 / 6]
    )
    np.testing.assert_allclose(hit_rate_curve(TOP, users, movies, stars, max_k=2), [0.2, 0.6])
    with pytest.raises(ValueError):
        hit_rate_curve(TOP, users, movies, stars, max_k=4)


def test_hit_rate_curve_no_qualifying_rating() -> None:
    curve = hit_rate_curve(TOP, np.array([1]), np.array([10]), np.array([3.0]))
    np.testing.assert_array_equal(curve, np.zeros(3))


def test_hit_rate_counts_duplicate_rows() -> None:
    users = np.array([1, 1, 1])
    movies = np.array([10, 10, 99])
    curve = hit_rate_curve(TOP, users, movies, np.full(3, 5.0))
    np.testing.assert_allclose(curve, [2 / 3, 2 / 3, 2 / 3])


# Relevant (stars >= 4): user 1 {20, 40}, user 2 {50} (duplicated), user 3 {10, 20, 70};
# user 3's rating of 30 is below threshold and user 4 has only low ratings (not averaged in).
R_USERS = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 4])
R_MOVIES = np.array([20, 40, 10, 50, 50, 10, 20, 70, 30, 10])
R_STARS = np.array([4.0, 5.0, 2.0, 4.0, 5.0, 4.0, 4.0, 5.0, 3.0, 1.0])


def test_recall_hand_values() -> None:
    # k=3: user1 1/2, user2 1/1, user3 {10} -> 1/3.
    assert recall_at_k(TOP, R_USERS, R_MOVIES, R_STARS, k=3) == pytest.approx(
        (1 / 2 + 1 + 1 / 3) / 3
    )
    # k=1: user1 10 not relevant -> 0; user2 20 -> 0; user3 30 -> 0.
    assert recall_at_k(TOP, R_USERS, R_MOVIES, R_STARS, k=1) == 0.0
    # k=2: user1 {20} 1/2; user2 {20, 40} 0; user3 {30, 10} 1/3.
    assert recall_at_k(TOP, R_USERS, R_MOVIES, R_STARS, k=2) == pytest.approx((1 / 2 + 1 / 3) / 3)


def test_ndcg_hand_values() -> None:
    lg = math.log2
    # user1: hit at rank 2, 2 relevant -> (1/lg3) / (1 + 1/lg3)
    u1 = (1 / lg(3)) / (1 + 1 / lg(3))
    # user2: hit at rank 3, 1 relevant -> (1/lg4) / 1
    u2 = 1 / lg(4)
    # user3: hit at rank 2, 3 relevant, ideal over min(3, 3) positions
    u3 = (1 / lg(3)) / (1 + 1 / lg(3) + 1 / lg(4))
    assert ndcg_at_k(TOP, R_USERS, R_MOVIES, R_STARS, k=3) == pytest.approx((u1 + u2 + u3) / 3)
    # k=2: ideal over min(2, |rel|) positions; user2's hit at rank 3 no longer counts.
    u1 = (1 / lg(3)) / (1 + 1 / lg(3))
    u3 = (1 / lg(3)) / (1 + 1 / lg(3))
    assert ndcg_at_k(TOP, R_USERS, R_MOVIES, R_STARS, k=2) == pytest.approx((u1 + 0 + u3) / 3)


def test_perfect_ranking_scores_one() -> None:
    top = np.array([[0, 0], [5, 6], [7, 0]])
    users, movies, stars = np.array([1, 1, 2]), np.array([6, 5, 7]), np.full(3, 5.0)
    assert recall_at_k(top, users, movies, stars, k=2) == 1.0
    assert ndcg_at_k(top, users, movies, stars, k=2) == pytest.approx(1.0)
    np.testing.assert_allclose(hit_rate_curve(top, users, movies, stars), [2 / 3, 1.0])


def test_no_relevant_users() -> None:
    assert recall_at_k(TOP, np.array([1]), np.array([10]), np.array([1.0]), k=3) == 0.0
    assert ndcg_at_k(TOP, np.array([1]), np.array([10]), np.array([1.0]), k=3) == 0.0


def test_scales_vectorised() -> None:
    rng = np.random.default_rng(0)
    num_rows, k, n = 20_000, 100, 500_000
    top = rng.integers(1, 5_000, size=(num_rows, k))
    users = rng.integers(1, num_rows, size=n)
    movies = np.where(rng.random(n) < 0.5, top[users, rng.integers(0, k, size=n)], 0)
    movies = np.where(movies == 0, rng.integers(5_000, 6_000, size=n), movies)
    stars = rng.integers(1, 6, size=n).astype(float)
    curve = hit_rate_curve(top, users, movies, stars)
    assert curve.shape == (k,)
    assert np.all(np.diff(curve) >= 0)
    assert curve[-1] == pytest.approx(0.5, abs=0.01)


def test_activity_buckets_and_labels() -> None:
    counts = np.array([0, 20, 21, 50, 51, 201])
    np.testing.assert_array_equal(bucket_by_edges(counts, (20, 50, 100, 200)), [0, 0, 1, 1, 2, 4])
    assert bucket_labels((20, 50)) == ["<=20", "21-50", ">50"]


def test_popularity_buckets_by_rating_share() -> None:
    # 10 ratings; descending: movie 1 (share before it 0.0) head, movie 2 (0.5) middle,
    # movies 3 (0.8) and 4 (0.9) tail; movie 0 has none: tail.
    np.testing.assert_array_equal(popularity_buckets(np.array([0, 5, 3, 1, 1])), [2, 0, 1, 2, 2])


def test_sliced_metrics_hand_values() -> None:
    users = np.array([1, 1, 2, 2, 3, 3, 3])
    movies = np.array([20, 40, 20, 50, 10, 0, 30])
    stars = np.array([5.0, 5.0, 5.0, 4.0, 5.0, 5.0, 3.0])
    slice_of_user = np.array([0, 0, 0, 1])  # users 1, 2 -> "light", user 3 -> "heavy"
    out = sliced_topk_metrics(
        TOP, users, movies, stars, slice_of_user[users], ["light", "heavy"], k=3
    )
    g = 1 / math.log2(3)  # gain at rank 2
    # light: 5-star (1,20) rank 1 hit, (1,40) miss, (2,20) hit; relevant user 1 {20, 40},
    # user 2 {20 at rank 0, 50 at rank 2}.
    assert out["light"]["hit@3"] == pytest.approx(2 / 3)
    assert out["light"]["recall@3"] == pytest.approx((1 / 2 + 1) / 2)
    assert out["light"]["ndcg@3"] == pytest.approx((g / (1 + g) + 1.5 / (1 + g)) / 2)
    assert out["light"]["rows"] == 4
    # heavy: 5-star (3,10) hit, (3,0) padding never hits; relevant {10} at rank 1.
    assert out["heavy"]["hit@3"] == pytest.approx(1 / 2)
    assert out["heavy"]["recall@3"] == pytest.approx(1.0)
    assert out["heavy"]["ndcg@3"] == pytest.approx(g)
    assert out["heavy"]["rows"] == 3


def test_coverage_counts_distinct_real_movies() -> None:
    assert coverage_at_k(TOP, np.array([1, 2, 3]), num_candidates=10, k=3) == pytest.approx(0.5)
    assert coverage_at_k(TOP, np.array([1]), num_candidates=10, k=3) == pytest.approx(0.3)
    assert coverage_at_k(TOP, np.array([3]), num_candidates=10, k=1) == pytest.approx(0.1)


def test_novelty_is_mean_self_information() -> None:
    # 3 training users; movie 10 rated by all (p = 1), movie 20 by one (p = 1/3).
    train_users = np.array([1, 1, 2, 3, 3])
    train_movies = np.array([10, 20, 10, 10, 10])  # a duplicate (3, 10) counts once
    top = np.array([[0, 0], [10, 20], [20, 0]])
    expected = (0.0 + 2 * math.log2(3)) / 3
    assert novelty_at_k(top, np.array([1, 2]), train_users, train_movies, k=2) == pytest.approx(
        expected
    )
    assert novelty_at_k(top, np.array([0]), train_users, train_movies, k=2) == 0.0
