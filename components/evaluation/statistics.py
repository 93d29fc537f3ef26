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


def user_topk_stats(
    top: np.ndarray,
    movies: np.ndarray,
    stars: np.ndarray,
    k: int,
    hit_stars: float,
    relevant_stars: float,
    prefix: str = "",
) -> dict[str, Any]:
    """One user's statistics: `top` [K] movie ids, `movies`/`stars` the user's test rows.

    hits: counts of 5-star rows (duplicates included) by rank (index K: absent); users with a
    relevant movie (>= relevant_stars, duplicates once) add to users/recall/ndcg sums."""
    top = np.asarray(top).reshape(1, -1)
    width = top.shape[1]
    movies = np.asarray(movies, dtype=np.int64)
    stars = np.asarray(stars, dtype=np.float64)
    zeros = np.zeros(len(movies), dtype=np.int64)
    hit_rows = stars >= hit_stars
    ranks = M.rank_positions(top, zeros[hit_rows], movies[hit_rows])
    out = {
        prefix + "hits": np.bincount(ranks, minlength=width + 1).astype(np.int64),
        prefix + "hit_rows": int(hit_rows.sum()),
    }
    relevant = np.unique(movies[(stars >= relevant_stars) & (movies != PADDING_ID)])
    if relevant.size:
        rel_ranks = M.rank_positions(top, np.zeros(relevant.size, np.int64), relevant)
        hit = rel_ranks < k
        dcg = float(np.sum(np.where(hit, 1.0 / np.log2(np.minimum(rel_ranks, k) + 2.0), 0.0)))
        ideal = float(np.sum(1.0 / np.log2(np.arange(1, min(relevant.size, k) + 1) + 1.0)))
        out[prefix + "users"] = 1
        out[prefix + "recall_sum"] = float(hit.sum()) / relevant.size
        out[prefix + "ndcg_sum"] = dcg / ideal
    return out


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


def finish(
    stats: dict[str, Any], k: int, explicit: bool, stars_per_unit: float, system: str = ""
) -> dict[str, Any]:
    """The figures `score_served_model` reports, and its hit@k curve, from summed statistics
    (`system`: the key prefix of a baseline's statistics, e.g. "popularity/")."""

    def curve(prefix: str) -> np.ndarray:
        hits, rows = stats.get(prefix + "hits"), stats.get(prefix + "hit_rows", 0)
        if hits is None or rows == 0:
            return np.zeros(len(hits) - 1 if hits is not None else k, dtype=np.float64)
        return np.cumsum(hits[:-1]) / rows

    full = curve(system)
    users = stats.get(system + "users", 0)
    metrics = {
        f"hit@{k}": float(full[k - 1]),
        f"recall@{k}": stats.get(system + "recall_sum", 0.0) / users if users else 0.0,
        f"ndcg@{k}": stats.get(system + "ndcg_sum", 0.0) / users if users else 0.0,
        "seed_hit@10": float(curve(system + "seed_")[k - 1]),
    }
    if explicit and not system and stats.get("rating_rows"):
        error = float(np.sqrt(stats["squared_error"] / stats["rating_rows"]))
        metrics.update({"rmse": error, "rmse_stars": error * stars_per_unit})
    return {"metrics": metrics, "curve": full}


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
