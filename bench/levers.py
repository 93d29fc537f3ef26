"""Lever sweep on the validation split (never the test split): each named configuration trained
once per seed on train minus validation and scored on validation, next to EASE tuned there.

    python bench/levers.py NAME [NAME ...]      (names from LEVERS; `all` for every one)

Appends one JSON line per run to --out, so a sweep can be resumed and tabulated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile

from bench.quality import K, carve_validation, fit_model, load_splits, model_metrics, tune_ease
from components.config import DEFAULT_TRAINING, TrainingConfig
from components.evaluation import topk_metrics

# The default before issue 10 (the sweep's starting point), rebuilt from today's default.
BASE = DEFAULT_TRAINING.replace(
    retrieval_negatives="in-batch",
    sampled_negatives=0,
    disliked_retrieval_weight=1.0,
    learning_rate_schedule="constant",
    epochs=12,
    rerank_pool=0,
)
LEVERS: dict[str, TrainingConfig] = {
    "base": BASE,
    "full": BASE.replace(retrieval_negatives="full", sampling_correction_weight=0.0),
    "full-t0.1": BASE.replace(retrieval_negatives="full", temperature=0.1),
    "full-t0.2": BASE.replace(retrieval_negatives="full", temperature=0.2),
    "mixed256": BASE.replace(retrieval_negatives="mixed", sampled_negatives=256),
    "mixed1024": BASE.replace(retrieval_negatives="mixed", sampled_negatives=1024),
    "liked0.3": BASE.replace(disliked_retrieval_weight=0.3),
    "liked0": BASE.replace(disliked_retrieval_weight=0.0),
    "cosine": BASE.replace(learning_rate_schedule="cosine"),
    "cosine-e20": BASE.replace(learning_rate_schedule="cosine", epochs=20),
    "dim64": BASE.replace(embedding_dim=64),
    "rating-emb32": BASE.replace(rating_embedding_dim=32),
    "product": BASE.replace(rating_product_feature=True),
    "rw20": BASE.replace(ranking_weight=20.0),
}
MIX = BASE.replace(
    retrieval_negatives="mixed", sampled_negatives=1024, disliked_retrieval_weight=0.3
)
LEVERS |= {
    "mix-liked": MIX,
    "mix-liked-cos20": MIX.replace(learning_rate_schedule="cosine", epochs=20),
    "mix2048-liked": MIX.replace(sampled_negatives=2048),
    "mix-liked-c1.5": MIX.replace(sampling_correction_weight=1.5),
    "mix-liked-c2.5": MIX.replace(sampling_correction_weight=2.5),
    "side": BASE.replace(use_side_features=True),
    "mc20-e30": MIX.replace(learning_rate_schedule="cosine", epochs=30),
    "mc20-l2-5e-4": MIX.replace(learning_rate_schedule="cosine", epochs=20, embedding_l2=5e-4),
    "mc20-l2-2e-3": MIX.replace(learning_rate_schedule="cosine", epochs=20, embedding_l2=2e-3),
    "mc20-lr6e-3": MIX.replace(learning_rate_schedule="cosine", epochs=20, learning_rate=6e-3),
    "mc20-side": MIX.replace(learning_rate_schedule="cosine", epochs=20, use_side_features=True),
    "mc20-b512": MIX.replace(learning_rate_schedule="cosine", epochs=20, batch_size=512),
    "mc20-bias1e-3": MIX.replace(learning_rate_schedule="cosine", epochs=20, bias_l2=1e-3),
    "mc20-bias1e-2": MIX.replace(learning_rate_schedule="cosine", epochs=20, bias_l2=1e-2),
    "mc16": MIX.replace(learning_rate_schedule="cosine", epochs=16),
    "mc20-product": MIX.replace(
        learning_rate_schedule="cosine", epochs=20, rating_product_feature=True
    ),
    "mc20-linear": MIX.replace(learning_rate_schedule="cosine", epochs=20, rating_hidden_units=()),
    "mc20-rw5": MIX.replace(learning_rate_schedule="cosine", epochs=20, ranking_weight=5.0),
    "mc20-h128": MIX.replace(
        learning_rate_schedule="cosine", epochs=20, rating_hidden_units=(128,)
    ),
    "final": DEFAULT_TRAINING,
    "final-rerank0": DEFAULT_TRAINING.replace(rerank_pool=0),
    "final-drop0.2": DEFAULT_TRAINING.replace(rating_dropout=0.2),
    "final-drop0.5": DEFAULT_TRAINING.replace(rating_dropout=0.5),
    "final-l2-2e-3": DEFAULT_TRAINING.replace(embedding_l2=2e-3),
    "hist-mean": BASE.replace(user_history_pooling="mean"),
    "hist-sqrtn": BASE.replace(user_history_pooling="sqrtn"),
    "mix-liked-cos20-hist": MIX.replace(
        learning_rate_schedule="cosine", epochs=20, user_history_pooling="sqrtn"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="+")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--data-dir", default="/work/shared/data/ml-100k")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mtrec-bench"))
    parser.add_argument("--out", default="levers.jsonl")
    parser.add_argument("--set", nargs="*", default=[], help="field=json overrides for all")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    train, test, num_movies = load_splits(args.data_dir, args.work_dir)
    fit, validation = carve_validation(train)
    num_users = int(max(train.users.max(), test.users.max())) + 1
    ease, grid, _ = tune_ease(fit, validation, num_users, num_movies)
    ease_metrics = topk_metrics(ease.top_k(K), validation)
    print(f"EASE lambda={ease.lam:g} validation: {ease_metrics}  grid={grid}", flush=True)
    names = list(LEVERS) if args.names == ["all"] else args.names
    for name in names:
        config = LEVERS[name].replace(**overrides)
        for seed in range(args.seeds):
            model, seconds = fit_model(
                fit, num_users, num_movies, config.replace(shuffle_seed=seed)
            )
            metrics = model_metrics(model, fit, validation)
            row = {
                "name": name,
                "set": overrides,
                "seed": seed,
                "fit_seconds": seconds,
                "fit_cpu_seconds": model.fit_cpu_seconds,
                **{k: metrics[k] for k in ("hit@10", "recall@10", "ndcg@10", "rmse")},
            }
            print(json.dumps(row), flush=True)
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
