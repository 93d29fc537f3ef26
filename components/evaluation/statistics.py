"""Sufficient statistics of the model's test figures, per batch of users, and their combiner.

Why: the in-process evaluation holds every test user's top-k in one numpy matrix. Here each
batch of users (scored inside a Beam DoFn) turns into a few counts and sums — hit counts per
rank, per-user recall and NDCG sums, squared errors — whose sum over batches gives exactly the
figures `evaluator.score_served_model` computes. Plain Python + numpy, no Beam or TensorFlow,
so the statistics are testable alone; `StatsCombineFn` is the Beam CombineFn that adds them.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import numpy as np

from components.evaluation import metrics as M
from components.features import PADDING_ID

K = 10
ACTIVITY_TITLE = "by user activity (training ratings)"  # the report's slice tables
POPULARITY_TITLE = "by item popularity"
Sums = dict[str, Any]  # flat: "system/figure" -> count, sum or array


def popularity_ranking(counts: list[tuple[int, int]]) -> np.ndarray:
    """(movie, training count) pairs -> movies most rated first, ties by lower id, padding out
    (as `baselines.popularity_ranking`); catalogue-sized."""
    pairs = sorted((m, c) for m, c in counts if m != PADDING_ID and c > 0)
    ids = np.array([m for m, _ in pairs], dtype=np.int64)
    n = np.array([c for _, c in pairs], dtype=np.int64)
    return ids[np.lexsort((ids, -n))] if ids.size else ids


def popularity_top(ranking: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    """The first k movies of the ranking the user has not seen, padded with 0 (as
    `baselines.popularity_top_k`); reads at most k + |seen| ranks."""
    prefix = ranking[: k + len(seen)]
    top = prefix[~np.isin(prefix, seen)][:k]
    return np.concatenate([top, np.zeros(k - len(top), dtype=np.int64)])


def add(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Sum of two statistics dicts, key by key (arrays of one length, or numbers)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = out[key] + value if key in out else value
    return out


# --- top-k lists of one batch of users ---


def _ideal_dcg(k: int) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(1, k + 1) + 1.0))])


def topk_sums(
    prefix: str,
    top: np.ndarray,
    rows: np.ndarray,
    movies: np.ndarray,
    stars: np.ndarray,
    k: int,
    hit_stars: float,
    relevant_stars: float,
) -> Sums:
    """Sums behind hit@1..width (counts of hit rows per rank), recall@k and NDCG@k for one
    batch: `top` [batch users, width], `rows[i]` the local user row of test row i."""
    width = top.shape[1]
    hit = stars >= hit_stars
    ranks = M.rank_positions(top, rows[hit], movies[hit])
    n_rel, hits, dcg = M.per_user_topk(top, rows, movies, stars, k, relevant_stars)
    idcg = _ideal_dcg(k)[np.minimum(n_rel.astype(np.int64), k)]
    return {
        f"{prefix}hit_counts": np.bincount(ranks, minlength=width + 1).astype(np.int64),
        f"{prefix}hit_rows": int(hit.sum()),
        f"{prefix}recall_sum": float(np.sum(hits / n_rel)) if n_rel.size else 0.0,
        f"{prefix}ndcg_sum": float(np.sum(dcg / idcg)) if n_rel.size else 0.0,
        f"{prefix}relevant_users": int(n_rel.size),
    }


def hit_curve(sums: Sums, prefix: str, max_k: int) -> np.ndarray:
    """hit@1..max_k from the summed rank counts (as `metrics.hit_rate_curve`)."""
    n = sums.get(f"{prefix}hit_rows", 0)
    if not n:
        return np.zeros(max_k, dtype=np.float64)
    return np.cumsum(np.asarray(sums[f"{prefix}hit_counts"])[:max_k]) / n


def topk_figures(sums: Sums, prefix: str, k: int) -> dict[str, float]:
    """hit@k, recall@k, NDCG@k (the keys `evaluator.topk_metrics` gives)."""
    users = sums.get(f"{prefix}relevant_users", 0)
    return {
        f"hit@{k}": float(hit_curve(sums, prefix, k)[-1]),
        f"recall@{k}": float(sums[f"{prefix}recall_sum"] / users) if users else 0.0,
        f"ndcg@{k}": float(sums[f"{prefix}ndcg_sum"] / users) if users else 0.0,
    }


def sliced_sums(
    prefix: str,
    top: np.ndarray,
    rows: np.ndarray,
    movies: np.ndarray,
    stars: np.ndarray,
    slices: dict[str, tuple[np.ndarray, int]],
    hit_stars: float,
    relevant_stars: float,
) -> Sums:
    """`topk_sums` at K restricted to each slice's test rows; `slices`: title -> (slice index
    per test row, number of slices)."""
    out: Sums = {}
    for title, (row_slice, count) in slices.items():
        for index in range(count):
            keep = row_slice == index
            name = f"{prefix}slice/{title}/{index}/"
            out.update(
                topk_sums(
                    name, top, rows[keep], movies[keep], stars[keep], K, hit_stars, relevant_stars
                )
            )
            out[f"{name}rows"] = int(keep.sum())
    return out


def sliced_rows(sums: Sums, systems: list[str], labels: dict[str, tuple[str, ...]]) -> dict:
    """The report's slice tables (as `evaluator.sliced_tables`) from the summed statistics."""
    tables = {}
    for title, names in labels.items():
        rows = []
        for system in systems:
            for index, label in enumerate(names):
                name = f"{system}/slice/{title}/{index}/"
                values = topk_figures(sums, name, K)
                rows.append(
                    {"system": system, "bucket": label, **values, "rows": int(sums[f"{name}rows"])}
                )
        tables[title] = rows
    return tables


def beyond_sums(
    prefix: str, top: np.ndarray, raters: np.ndarray, num_users: int, width: int
) -> Sums:
    """Coverage (how often each movie is shown) and novelty (summed self-information) of the
    batch's top-K lists; `raters[m]` distinct training users of movie m."""
    items = top[:, :K]
    items = items[items > PADDING_ID].astype(np.int64)
    known = np.zeros(items.shape, dtype=np.float64)
    inside = items < raters.size
    known[inside] = raters[items[inside]]
    information = -np.log2(np.maximum(known, 1.0) / max(num_users, 1))
    return {
        f"{prefix}shown": np.bincount(items, minlength=width).astype(np.int64),
        f"{prefix}novelty_sum": float(information.sum()),
        f"{prefix}novelty_items": int(items.size),
    }


def beyond_figures(sums: Sums, prefix: str, candidates: int) -> dict[str, float]:
    """coverage@10 and novelty@10 (as `evaluator.beyond_accuracy`)."""
    shown = int(np.count_nonzero(np.asarray(sums[f"{prefix}shown"])[1:]))
    items = sums[f"{prefix}novelty_items"]
    return {
        "coverage@10": float(shown / candidates) if candidates else 0.0,
        "novelty@10": float(sums[f"{prefix}novelty_sum"] / items) if items else 0.0,
    }


# --- ratings ---


def rating_sums(prefix: str, predicted: np.ndarray, targets: np.ndarray) -> Sums:
    error = np.asarray(predicted, dtype=np.float64) - np.asarray(targets, dtype=np.float64)
    return {f"{prefix}sse": float(np.sum(error**2)), f"{prefix}rated": int(error.size)}


def rating_figures(sums: Sums, prefix: str, stars_per_unit: float) -> dict[str, float]:
    """RMSE normalised and in stars (as `evaluator.rating_metrics`)."""
    n = sums.get(f"{prefix}rated", 0)
    if not n:
        raise ValueError("rmse of an empty array")
    error = float(np.sqrt(sums[f"{prefix}sse"] / n))
    return {"rmse": error, "rmse_stars": error * stars_per_unit}


def dense_rows(
    distinct: np.ndarray, users: np.ndarray, movies: np.ndarray, width: int
) -> np.ndarray:
    """Binary [len(distinct), width] user x movie matrix of the (users, movies) pairs whose user is
    in `distinct` (EASE's X for one batch)."""
    x = np.zeros((distinct.size, width), dtype=np.float64)
    pos = np.searchsorted(distinct, users)
    inside = (pos < distinct.size) & (distinct[np.minimum(pos, max(distinct.size - 1, 0))] == users)
    x[pos[inside], movies[inside]] = 1.0
    return x


class StatsCombineFn(beam.CombineFn):
    """Adds per-batch statistics dicts: the accumulator is one dict of catalogue-free size."""

    def create_accumulator(self) -> dict[str, Any]:
        return {}

    def add_input(self, accumulator, element):
        return add(accumulator, element)

    def merge_accumulators(self, accumulators):
        out: dict[str, Any] = {}
        for accumulator in accumulators:
            out = add(out, accumulator)
        return out

    def extract_output(self, accumulator):
        return accumulator
