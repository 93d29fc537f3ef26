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


def per_user_topk(
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
    n_rel, hits, _ = per_user_topk(top_ids, users, movies, stars, k, min_stars)
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
    n_rel, _, dcg = per_user_topk(top_ids, users, movies, stars, k, min_stars)
    if n_rel.size == 0:
        return 0.0
    ideal_table = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(1, k + 1) + 1.0))])
    idcg = ideal_table[np.minimum(n_rel.astype(np.int64), k)]
    return float(np.mean(dcg / idcg))


# --- slices, coverage and novelty (pure numpy, for the report and the gates) ---

# Upper bounds (inclusive) of the user-activity buckets: number of training ratings.
USER_ACTIVITY_EDGES = (20, 50, 100, 200)
# Item-popularity buckets by share of training ratings: the head holds the most-rated items that
# together take HEAD_SHARE of the ratings, the tail the least-rated ones taking TAIL_SHARE.
HEAD_SHARE = 0.5
TAIL_SHARE = 0.2


def bucket_by_edges(counts: np.ndarray, edges: tuple[int, ...] = USER_ACTIVITY_EDGES) -> np.ndarray:
    """Bucket index per id: 0 for counts <= edges[0], ..., len(edges) above the last edge."""
    return np.searchsorted(np.asarray(edges), np.asarray(counts), side="left").astype(np.int64)


def bucket_labels(edges: tuple[int, ...] = USER_ACTIVITY_EDGES) -> list[str]:
    """Readable labels of `bucket_by_edges`' buckets, e.g. '<=20', '21-50', '>200'."""
    labels = [f"<={edges[0]}"]
    labels += [f"{lo + 1}-{hi}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return labels + [f">{edges[-1]}"]


def popularity_buckets(
    item_counts: np.ndarray, head_share: float = HEAD_SHARE, tail_share: float = TAIL_SHARE
) -> np.ndarray:
    """0 = head, 1 = middle, 2 = tail per item id, by cumulative share of training ratings in
    descending-popularity order (ties by lower id). Items with no rating are tail."""
    counts = np.asarray(item_counts, dtype=np.float64)
    order = np.lexsort((np.arange(counts.size), -counts))
    before = np.concatenate([[0.0], np.cumsum(counts[order])[:-1]]) / max(counts.sum(), 1.0)
    bucket = np.where(before < head_share, 0, np.where(before < 1.0 - tail_share, 1, 2))
    out = np.empty(counts.size, dtype=np.int64)
    out[order] = bucket
    out[counts == 0] = 2
    return out


POPULARITY_LABELS = ("head", "middle", "tail")


def sliced_topk_metrics(
    top_ids: np.ndarray,
    users: np.ndarray,
    movies: np.ndarray,
    stars: np.ndarray,
    row_slice: np.ndarray,
    labels: list[str] | tuple[str, ...],
    k: int = 10,
    hit_stars: float = 5.0,
    relevant_stars: float = 4.0,
) -> dict[str, dict[str, float]]:
    """hit@k (5-star rows), recall@k and NDCG@k (>= 4 stars) restricted to the test rows of each
    slice; `row_slice[i]` is the slice index of test row i (e.g. its user's activity bucket, or
    its movie's popularity bucket). `rows` counts the slice's test rows."""
    row_slice = np.asarray(row_slice).ravel()
    users, movies, stars = (np.asarray(a).ravel() for a in (users, movies, stars))
    out = {}
    for index, label in enumerate(labels):
        keep = row_slice == index
        u, m, s = users[keep], movies[keep], stars[keep]
        out[label] = {
            f"hit@{k}": float(hit_rate_curve(top_ids, u, m, s, hit_stars, k)[-1]),
            f"recall@{k}": recall_at_k(top_ids, u, m, s, k, relevant_stars),
            f"ndcg@{k}": ndcg_at_k(top_ids, u, m, s, k, relevant_stars),
            "rows": float(keep.sum()),
        }
    return out


def coverage_at_k(top_ids: np.ndarray, rows: np.ndarray, num_candidates: int, k: int = 10) -> float:
    """Catalogue coverage: share of the `num_candidates` recommendable movies that appear in the
    top k of at least one of the given user rows (padding and -1 slots ignored)."""
    top = _check_top_ids(top_ids)[np.asarray(rows, dtype=np.int64), :k]
    shown = np.unique(top[top > PADDING_ID])
    return float(shown.size / num_candidates) if num_candidates else 0.0


def novelty_at_k(
    top_ids: np.ndarray,
    rows: np.ndarray,
    train_users: np.ndarray,
    train_movies: np.ndarray,
    k: int = 10,
) -> float:
    """Mean self-information -log2 p(movie) of the recommended movies (higher = less obvious),
    p(movie) = share of training users who rated it (Zhou et al. 2010), floored at one user."""
    top = _check_top_ids(top_ids)[np.asarray(rows, dtype=np.int64), :k]
    items = top[top > PADDING_ID].astype(np.int64)
    if items.size == 0:
        return 0.0
    pairs = np.unique(np.stack([np.asarray(train_users), np.asarray(train_movies)], 1), axis=0)
    num_users = max(np.unique(pairs[:, 0]).size, 1)
    width = int(max(items.max(), pairs[:, 1].max() if pairs.size else 0)) + 1
    raters = np.maximum(np.bincount(pairs[:, 1], minlength=width), 1)
    return float(np.mean(-np.log2(raters[items] / num_users)))
