"""The Beam evaluation's DoFns: one batch of users (`user_batches.py`: each user's train,
validation and test rows) in, one dict of sums out (`statistics.py`), yielded from `process`.

Why here: every per-user figure of the in-process evaluation (the served models' top-k and
ratings, popularity, EASE, the bias model, slices, coverage, novelty) is computed on one batch
at a time, against catalogue-sized side inputs (popularity ranking, movie biases, EASE's item
matrix). A DoFn loads each SavedModel once per worker, in `setup`, through
`apache_beam.utils.shared.Shared` (as TFMA and RunInference do), so threads of a worker share it.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.utils import shared

from components.evaluation import metrics as M
from components.evaluation import statistics as S
from components.evaluation.baselines import DEFAULT_USER_REG, ease_top_k
from components.evaluation.user_batches import Batch

DENSE_USERS = 512  # users per dense [users, catalogue] block of the catalogue sums

_MODELS = shared.Shared()


def catalogue_sums(batch: dict | str, width: int, dense: bool, user_reg: float = DEFAULT_USER_REG):
    """Catalogue-sized sums of one batch: training counts and raters per movie, rating sums,
    cold-start counts; with `dense` (catalogue within EASE's limit) EASE's Gram X^T X and the
    bias model's sums (`baselines.bias_item_sweeps`)."""
    b = Batch(batch)
    counts = b.train_counts()
    first = np.r_[True, np.diff(b.train_rows) != 0] | np.r_[True, np.diff(b.train_movies) != 0]
    out: dict[str, Any] = {
        "item_counts": np.bincount(b.train_movies, minlength=width),
        "raters": np.bincount(b.train_movies[first], minlength=width),  # rows sorted by user, movie
        "train_users": int(np.count_nonzero(counts)),
        "rating_sum": float(b.train_ratings.sum()),
        "rating_rows": int(b.train_ratings.size),
        "item_rating_sum": np.bincount(b.train_movies, weights=b.train_ratings, minlength=width),
        "test_movie_rows": np.bincount(b.test_movies, minlength=width),
        "cold_users": int(np.count_nonzero(b.users[b.test_rows] == 0)),
        "cold_movies": int(np.count_nonzero(b.test_movies == 0)),
    }
    if dense:
        weight = 1.0 / (counts + user_reg)
        user_sum = np.bincount(b.train_rows, weights=b.train_ratings, minlength=b.users.size)
        gram, user_gram = np.zeros((width, width)), np.zeros((width, width))
        terms_sum, terms_count = np.zeros(width), np.zeros(width)
        for start in range(0, b.users.size, DENSE_USERS):
            rows = np.arange(start, min(start + DENSE_USERS, b.users.size))
            x = b.history(rows, width)
            gram += x.T @ x
            c = np.zeros_like(x)
            keep = (b.train_rows >= rows[0]) & (b.train_rows <= rows[-1])
            np.add.at(c, (b.train_rows[keep] - rows[0], b.train_movies[keep]), 1.0)
            user_gram += (c * weight[rows, None]).T @ c
            terms_sum += c.T @ (weight[rows] * user_sum[rows])
            terms_count += c.T @ (weight[rows] * counts[rows])
        out.update(
            {
                "gram": gram,
                "user_gram": user_gram,
                "terms_sum": terms_sum,
                "terms_count": terms_count,
            }
        )
    return out


def bias_sweep_sums(
    batch: dict | str, item_bias: np.ndarray, mu: float, width: int
) -> dict[str, Any]:
    """One alternating sweep of the bias model on a batch (large catalogues, no Gram): the users'
    biases given the movie biases, and per movie the sum of (r - mu - b_user)."""
    b = Batch(batch)
    resid = b.train_ratings - mu
    user_bias = user_biases(b, item_bias, mu)
    return {
        "item_residual": np.bincount(
            b.train_movies, weights=resid - user_bias[b.train_rows], minlength=width
        )
    }


def user_biases(b: Batch, item_bias: np.ndarray, mu: float, user_reg: float = DEFAULT_USER_REG):
    """The bias model's user biases of a batch given its movie biases (`BiasModel.fit`)."""
    resid = b.train_ratings - mu - item_bias[b.train_movies]
    sums = np.bincount(b.train_rows, weights=resid, minlength=b.users.size)
    denom = b.train_counts() + user_reg
    return np.divide(sums, denom, out=np.zeros_like(sums), where=denom > 0)


class EaseValidationFn(beam.DoFn):
    """hit@10 counts of EASE on the validation rows for every lambda of the grid (its training
    pairs skipped), per batch; the weights per lambda are built once per DoFn instance."""

    def __init__(self, lambdas: tuple[float, ...], hit_stars: float) -> None:
        self.lambdas, self.hit_stars = lambdas, hit_stars
        self._weights: dict[float, np.ndarray] = {}

    def process(self, batch, fitted, side):
        ease, _ = fitted
        if ease is None:
            return
        b = Batch(batch)
        rows = np.unique(b.val_rows)
        if rows.size == 0:
            return
        x = b.history(rows, ease.num_items)
        local = np.searchsorted(rows, b.val_rows)
        hit = b.val_stars >= self.hit_stars
        out = {"rows": int(hit.sum())}
        for index, lam in enumerate(self.lambdas):
            if lam not in self._weights:
                self._weights[lam] = ease.weights_for(lam)
            top = ease_top_k(x, self._weights[lam], S.K, side["not_candidate"])
            ranks = M.rank_positions(top, local[hit], b.val_movies[hit])
            out[f"hits/{index}"] = int(np.count_nonzero(ranks < S.K))
        yield out


def _load_model(path: str, examples_dir: str):
    from components.artifacts.examples import load_stats
    from components.artifacts.saved_model import ServedModel
    from components.artifacts.vocabulary import load_vocabularies

    class Holder:  # weak-referenceable, as Shared needs
        def __init__(self):
            vocabularies = load_vocabularies(examples_dir, load_stats(examples_dir))
            self.model = ServedModel(path, vocabularies)

    return Holder()


class ScoreBatchFn(beam.DoFn):
    """Scores a batch of users: the served models through their signatures (candidate, and the
    previously blessed model when given), popularity, EASE, global mean and the bias model; yields
    one dict of sums per batch."""

    def __init__(self, models: dict[str, str], examples_dir: str, settings: dict[str, Any]):
        self.paths, self.examples_dir, self.settings = models, examples_dir, settings

    def setup(self):
        self.models = {
            name: _MODELS.acquire(lambda p=path: _load_model(p, self.examples_dir), tag=path).model
            for name, path in self.paths.items()
        }

    def process(self, batch, side, ease, bias):
        b, s = Batch(batch), self.settings
        tested = np.unique(b.test_rows)
        if tested.size == 0:
            return
        local = np.searchsorted(tested, b.test_rows)
        movies, stars, ratings = b.test_movies, b.test_stars, b.test_ratings
        users = b.users[tested]
        seen = [b.seen(row) for row in tested]
        activity = M.bucket_by_edges(b.train_counts()[b.test_rows])
        popularity = side["popularity_bucket"][np.minimum(movies, side["width"] - 1)]
        slices = {
            S.ACTIVITY_TITLE: (activity, len(M.bucket_labels())),
            S.POPULARITY_TITLE: (popularity, len(M.POPULARITY_LABELS)),
        }
        ranked: dict[str, np.ndarray] = {}
        out: dict[str, Any] = {}

        def topk(prefix, top, k, seed_top=None):
            out.update(
                S.topk_sums(
                    prefix, top, local, movies, stars, k, s["hit_stars"], s["relevant_stars"]
                )
            )
            if seed_top is not None:
                seed = S.topk_sums(
                    prefix + "seed_",
                    seed_top,
                    local,
                    movies,
                    stars,
                    k,
                    s["hit_stars"],
                    s["relevant_stars"],
                )
                out.update({key: value for key, value in seed.items() if "hit_" in key})

        for name, model in self.models.items():
            known = users > 0
            top = np.full((tested.size, model.k), -1, dtype=np.int32)
            top_seen = top.copy()
            if known.any():
                top[known] = model.top_k(users[known], [seen[i] for i in np.flatnonzero(known)])
                top_seen[known] = model.top_k(users[known])
            topk(f"{name}/", top, min(S.K, model.k), top_seen)
            if name == "model":
                ranked[name] = top
            if model.rates:
                predicted = np.full(movies.size, side["mean32"], dtype=np.float32)
                user_of_row = users[local]
                scorable = (user_of_row > 0) & (movies > 0)
                if scorable.any():
                    predicted[scorable] = model.predict_rating(
                        user_of_row[scorable], movies[scorable]
                    )
                out.update(S.rating_sums(f"{name}/", predicted, ratings))
        ranking = side["ranking"]
        popular = np.stack([S.popularity_top(ranking, row, S.K) for row in seen])
        head = np.tile(S.popularity_top(ranking, ranking[:0], S.K), (tested.size, 1))
        topk("popularity/", popular, S.K, head)
        ranked["popularity"] = popular
        if ease["weights"] is not None:
            x = b.history(tested, ease["num_items"])
            val = np.isin(b.val_rows, tested)
            excluded = np.searchsorted(tested, b.val_rows[val])
            top = ease_top_k(
                x, ease["weights"], S.K, side["not_candidate"], excluded, b.val_movies[val]
            )
            topk("EASE/", top, S.K)
            ranked["EASE"] = top
        for name, top in ranked.items():
            out.update(
                S.beyond_sums(f"{name}/", top, side["raters"], side["train_users"], side["width"])
            )
            hit, relevant = s["hit_stars"], s["relevant_stars"]
            out.update(S.sliced_sums(f"{name}/", top, local, movies, stars, slices, hit, relevant))
        if s["explicit"]:
            out.update(S.rating_sums("global mean/", np.full(movies.size, side["mean64"]), ratings))
            user_bias = user_biases(b, bias["previous"], bias["mu"])[b.test_rows]
            item_bias = np.where(
                movies < bias["items"].size,
                bias["items"][np.minimum(movies, bias["items"].size - 1)],
                0.0,
            )
            predicted = np.clip(bias["mu"] + user_bias + item_bias, 0.0, 1.0)
            out.update(S.rating_sums("user+item bias/", predicted, ratings))
        yield out
