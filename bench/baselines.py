"""Calibrate the baselines on ML-100k and print their figures (run by hand, not a test).

Why: the blessing gates compare the candidate with these baselines, so their figures on the seed's
data must match known references (popularity hit@10 ~0.13, bias RMSE ~0.2375, EASE hit@10 ~0.26)
before the gates can be trusted. Also picks the default regularisation of `BiasModel`.

Usage: python bench/baselines.py [path/to/u.data]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from components.evaluation.baselines import EASE, BiasModel, global_mean_predict, popularity_top_k
from components.evaluation.metrics import hit_rate_curve, ndcg_at_k, recall_at_k, rmse

DEFAULT_DATA = "/work/shared/data/ml-100k/u.data"
SEED = 42
TEST_FRACTION = 0.2
K = 10


def load(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = np.loadtxt(path, dtype=np.int64, delimiter="\t")
    return data[:, 0], data[:, 1], data[:, 2].astype(np.float64)


def split(n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * TEST_FRACTION))
    return perm[n_test:], perm[:n_test]


def topk_figures(name: str, top: np.ndarray, u: np.ndarray, m: np.ndarray, s: np.ndarray) -> None:
    curve = hit_rate_curve(top, u, m, s, min_stars=5.0, max_k=K)
    print(
        f"{name:28s} hit@1={curve[0]:.4f} hit@5={curve[4]:.4f} hit@10={curve[9]:.4f} "
        f"recall@10={recall_at_k(top, u, m, s, k=K):.4f} ndcg@10={ndcg_at_k(top, u, m, s, k=K):.4f}"
    )


def main(path: str = DEFAULT_DATA) -> None:
    users, movies, stars = load(path)
    tr, te = split(users.size)
    ratings = (stars - 1.0) / 4.0
    num_rows = int(users.max()) + 1
    num_items = int(movies.max()) + 1
    print(f"{Path(path).name}: {users.size} ratings, train {tr.size}, test {te.size}")
    tu, tm, ts = users[te], movies[te], stars[te]
    print(f"5-star test ratings: {int((ts >= 5).sum())}")

    t0 = time.perf_counter()
    pop = popularity_top_k(users[tr], movies[tr], num_rows, K, exclude_seen=True)
    t_pop = time.perf_counter() - t0
    pop_all = popularity_top_k(users[tr], movies[tr], num_rows, K, exclude_seen=False)
    topk_figures("popularity (seen excluded)", pop, tu, tm, ts)
    topk_figures("popularity (seen included)", pop_all, tu, tm, ts)
    print(f"  popularity_top_k time: {t_pop * 1000:.1f} ms")

    gm = global_mean_predict(ratings[tr], te.size)
    print(f"global mean RMSE (normalised) = {rmse(gm, ratings[te]):.4f}")

    print("bias model RMSE (normalised) by reg (user_reg = item_reg):")
    for reg in (0.0, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 25.0):
        model = BiasModel(user_reg=reg, item_reg=reg).fit(users[tr], movies[tr], ratings[tr])
        print(f"  reg={reg:5.1f}  rmse={rmse(model.predict(tu, tm), ratings[te]):.4f}")
    model = BiasModel().fit(users[tr], movies[tr], ratings[tr])
    print(
        f"bias model default (user_reg={model.user_reg}, item_reg={model.item_reg}): "
        f"RMSE = {rmse(model.predict(tu, tm), ratings[te]):.4f}"
    )

    t0 = time.perf_counter()
    ease = EASE(lam=500.0).fit(users[tr], movies[tr], num_rows, num_items).top_k(K)
    t_ease = time.perf_counter() - t0
    topk_figures("EASE lambda=500", ease, tu, tm, ts)
    print(f"  EASE time: {t_ease:.2f} s")


if __name__ == "__main__":
    main(*sys.argv[1:2])
