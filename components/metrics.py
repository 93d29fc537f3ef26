"""Rating and top-k metrics of the evaluation stage, in plain numpy.

Kept free of TensorFlow so the evaluation stage, the baselines and the tests share one definition
of every figure, and so the metrics scale to ML-25M sizes (160k users x 100, 5M test rows)
without a Python loop over ratings.

Top-k results are a matrix `top_ids` [num_rows, K] whose row index is the user id; movie id 0
(`features.PADDING_ID`) is padding and never counts as a hit. Test interactions are parallel
arrays `users`, `movies`, `stars`.
"""

from __future__ import annotations

import numpy as np

from components.features import PADDING_ID


def rmse(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Root mean squared error; the rating head's metric (in whatever units both arrays use)."""
    p = np.asarray(predictions, dtype=np.float64).ravel()
    t = np.asarray(targets, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"predictions and targets differ in size: {p.size} != {t.size}")
    if p.size == 0:
        raise ValueError("rmse of an empty array")
    return float(np.sqrt(np.mean((p - t) ** 2)))


def _check_top_ids(top_ids: np.ndarray) -> np.ndarray:
    top = np.asarray(top_ids)
    if top.ndim != 2:
        raise ValueError(f"top_ids must be 2-D [num_rows, K], got shape {top.shape}")
    if not np.issubdtype(top.dtype, np.integer):
        raise ValueError(f"top_ids must be integer movie ids, got dtype {top.dtype}")
    return top


def rank_positions(top_ids: np.ndarray, users: np.ndarray, movies: np.ndarray) -> np.ndarray:
    """0-based position of each (user, movie) in that user's top-k row, K where absent.

    Sort-and-search instead of a [num_test, K] comparison, so memory stays O(rows * K + num_test).
    Users outside `top_ids`' rows and the padding movie are always absent.
    """
    top = _check_top_ids(top_ids)
    users = np.asarray(users, dtype=np.int64).ravel()
    movies = np.asarray(movies, dtype=np.int64).ravel()
    if users.shape != movies.shape:
        raise ValueError(f"users and movies differ in size: {users.size} != {movies.size}")
    num_rows, k = top.shape
    out = np.full(users.shape, k, dtype=np.int64)
    if users.size == 0 or top.size == 0:
        return out

    flat = top.astype(np.int64).ravel()
    row = np.repeat(np.arange(num_rows, dtype=np.int64), k)
    rank = np.tile(np.arange(k, dtype=np.int64), num_rows)
    keep = flat != PADDING_ID
    flat, row, rank = flat[keep], row[keep], rank[keep]
    if flat.size == 0:
        return out

    width = int(max(flat.max(), movies.max(), 0)) + 1
    keys = row * width + flat
    # Sort by key, then rank, so the first of equal keys is the best (lowest) rank.
    order = np.lexsort((rank, keys))
    keys, rank = keys[order], rank[order]
    first = np.ones(keys.shape, dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    keys, rank = keys[first], rank[first]

    valid = (users >= 0) & (users < num_rows) & (movies > PADDING_ID)
    query = users[valid] * width + movies[valid]
    pos = np.searchsorted(keys, query)
    pos_c = np.minimum(pos, keys.size - 1)
    found = keys[pos_c] == query
    sub = np.full(query.shape, k, dtype=np.int64)
    sub[found] = rank[pos_c[found]]
    out[valid] = sub
    return out


def hit_rate_curve(
    top_ids: np.ndarray,
    users: np.ndarray,
    movies: np.ndarray,
    stars: np.ndarray,
    min_stars: float = 5.0,
    max_k: int | None = None,
) -> np.ndarray:
    """Hit@k for k = 1..max_k: share of test ratings with stars >= min_stars found in the top k.

    Element 9 with the defaults is the seed notebook's metric (5-star test ratings whose movie is
    in the user's top 10). Counts every qualifying test row, duplicates included. Returns zeros
    when no test rating qualifies.
    """
    top = _check_top_ids(top_ids)
    k_all = top.shape[1]
    max_k = k_all if max_k is None else int(max_k)
    if not 1 <= max_k <= k_all:
        raise ValueError(f"max_k must be in [1, {k_all}] (the width of top_ids), got {max_k}")
    stars = np.asarray(stars, dtype=np.float64).ravel()
    mask = stars >= min_stars
    n = int(mask.sum())
    if n == 0:
        return np.zeros(max_k, dtype=np.float64)
    ranks = rank_positions(top, np.asarray(users).ravel()[mask], np.asarray(movies).ravel()[mask])
    counts = np.bincount(ranks, minlength=k_all + 1)[:max_k]
    return np.cumsum(counts) / n


def _per_user_topk(
    top_ids: np.ndarray,
    users: np.ndarray,
    movies: np.ndarray,
    stars: np.ndarray,
    k: int,
    min_stars: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per relevant user: (number of relevant movies, hits in top k, DCG@k), duplicates once."""
    top = _check_top_ids(top_ids)
    if not 1 <= k <= top.shape[1]:
        raise ValueError(f"k must be in [1, {top.shape[1]}] (the width of top_ids), got {k}")
    users = np.asarray(users, dtype=np.int64).ravel()
    movies = np.asarray(movies, dtype=np.int64).ravel()
    stars = np.asarray(stars, dtype=np.float64).ravel()
    if not users.shape == movies.shape == stars.shape:
        raise ValueError("users, movies and stars must have the same length")
    mask = (stars >= min_stars) & (movies != PADDING_ID)
    pairs = np.unique(np.stack([users[mask], movies[mask]], axis=1), axis=0)
    if pairs.shape[0] == 0:
        empty = np.zeros(0, dtype=np.float64)
        return empty, empty, empty
    ranks = rank_positions(top, pairs[:, 0], pairs[:, 1])
    hit = ranks < k
    gain = np.where(hit, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0)
    _, user_idx = np.unique(pairs[:, 0], return_inverse=True)
    n_rel = np.bincount(user_idx).astype(np.float64)
    hits = np.bincount(user_idx, weights=hit.astype(np.float64))
    dcg = np.bincount(user_idx, weights=gain)
    return n_rel, hits, dcg


def recall_at_k(
    top_ids: np.ndarray,
    users: np.ndarray,
    movies: np.ndarray,
    stars: np.ndarray,
    k: int = 10,
    min_stars: float = 4.0,
) -> float:
    """Mean over users with a relevant test movie of |top k ∩ relevant| / |relevant|.

    Per-user averaging, unlike `hit_rate_curve`, so heavy raters do not dominate. Returns 0.0 when
    no user has a relevant movie.
    """
    n_rel, hits, _ = _per_user_topk(top_ids, users, movies, stars, k, min_stars)
    if n_rel.size == 0:
        return 0.0
    return float(np.mean(hits / n_rel))


def ndcg_at_k(
    top_ids: np.ndarray,
    users: np.ndarray,
    movies: np.ndarray,
    stars: np.ndarray,
    k: int = 10,
    min_stars: float = 4.0,
) -> float:
    """Binary-relevance NDCG@k, mean over users with a relevant test movie.

    DCG sums 1/log2(r+1) over hits at 1-based rank r; the ideal DCG fills min(k, |relevant|)
    positions. Rewards putting hits near the top, which recall ignores.
    """
    n_rel, _, dcg = _per_user_topk(top_ids, users, movies, stars, k, min_stars)
    if n_rel.size == 0:
        return 0.0
    ideal_table = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(1, k + 1) + 1.0))])
    idcg = ideal_table[np.minimum(n_rel.astype(np.int64), k)]
    return float(np.mean(dcg / idcg))
