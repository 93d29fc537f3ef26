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
from components.evaluation.evaluator import topk_metrics

# The default of issue 12 (8 epochs at 1e-2), rebuilt from today's default.
EIGHT = DEFAULT_TRAINING.replace(
    ema_momentum=0.0,
    final_learning_rate_fraction=0.0,
    bias_l2=0.0,
    ranking_weight=10.0,
    rating_hidden_units=(64,),
    rating_heads=1,
    sampled_negatives=1024,
    rerank_rating_weight=3.0,
)
# The default before issue 10 (the sweep's starting point), rebuilt from today's default.
BASE = EIGHT.replace(
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

# Issue 10's RMSE target: levers on the 8-epoch default (`eight`).
EMA = EIGHT.replace(ema_momentum=0.99, final_learning_rate_fraction=0.3)
EMA_BIAS = EMA.replace(bias_l2=1e-3)
LEVERS |= {
    "eight": EIGHT,
    "eight-ema0.99": EIGHT.replace(ema_momentum=0.99),
    "eight-ema0.995": EIGHT.replace(ema_momentum=0.995),
    "eight-final0.3": EIGHT.replace(final_learning_rate_fraction=0.3),
    "ema": EMA,
    "ema-final0.5": EMA.replace(final_learning_rate_fraction=0.5),
    "ema-final1": EMA.replace(final_learning_rate_fraction=1.0),
    "ema-m0.98": EMA.replace(ema_momentum=0.98),
    "ema-rw20": EMA.replace(ranking_weight=20.0),
    "ema-h128": EMA.replace(rating_hidden_units=(128,)),
    "ema-l2-2e-3": EMA.replace(embedding_l2=2e-3),
    "ema-product": EMA.replace(rating_product_feature=True),
    "ema-bias1e-3": EMA_BIAS,
    "ema-bias1e-2": EMA.replace(bias_l2=1e-2),
    "ema-bias-h128": EMA_BIAS.replace(rating_hidden_units=(128,)),
    "ema-bias-heads3": EMA_BIAS.replace(rating_heads=3),
    "ema-bias-indrop0.1": EMA_BIAS.replace(rating_input_dropout=0.1),
    "ema-bias-h128-heads3": EMA_BIAS.replace(rating_hidden_units=(128,), rating_heads=3),
    "ema-bias-h128-rw20-heads3": EMA_BIAS.replace(
        rating_hidden_units=(128,), ranking_weight=20.0, rating_heads=3
    ),
    "ema-bias-h256-rw20-heads3": EMA_BIAS.replace(
        rating_hidden_units=(256,), ranking_weight=20.0, rating_heads=3
    ),
    "ema-bias-h256-rw20-heads5": EMA_BIAS.replace(
        rating_hidden_units=(256,), ranking_weight=20.0, rating_heads=5
    ),
    "ema-bias-h512-rw20": EMA_BIAS.replace(rating_hidden_units=(512,), ranking_weight=20.0),
    "ema-bias-h1024-rw20-heads3": EMA_BIAS.replace(
        rating_hidden_units=(1024,), ranking_weight=20.0, rating_heads=3
    ),
}
# The first pick (3 heads), then 2048 uniform negatives and rerank weight 2 for recall@10.
PICK = EMA_BIAS.replace(rating_hidden_units=(256,), ranking_weight=20.0, rating_heads=3)
PICK_RECALL = PICK.replace(sampled_negatives=2048, rerank_rating_weight=2.0)
LEVERS |= {
    "pick": PICK,
    "pick-n2048": PICK.replace(sampled_negatives=2048),
    "pick-w2": PICK.replace(rerank_rating_weight=2.0),
    "pick-n2048-w2": PICK_RECALL,
    "pick-n2048-w2-heads5": PICK_RECALL.replace(rating_heads=5),
    "pick-n2048-w2-bias3e-3": PICK_RECALL.replace(bias_l2=3e-3),
    "pick-n2048-w2-h512": PICK_RECALL.replace(rating_hidden_units=(512,)),
    "pick-n2048-w2-heads5-bias3e-3": PICK_RECALL.replace(rating_heads=5, bias_l2=3e-3),
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
