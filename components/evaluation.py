"""Stage 4, evaluation: metrics on the test split, baselines in the same run, gates, report.

Protocol (the standard one): each user's top-k over the whole catalogue, movies the user rated in
training excluded. Metrics: hit@10 over 5-star test ratings (the seed's metric without seen
movies), recall@10 and NDCG@10 over test movies rated >= 4, the seed's own metric (seen
included), and RMSE (normalised and in stars). Baselines computed on the same split: popularity,
global mean, a user+item bias model. Gates: absolute thresholds, beating the baselines, and no
regression beyond a tolerance against the previously blessed model in the export location.
"""

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components import features as F
from components import metrics as M
from components.baselines import BiasModel, global_mean_predict, popularity_top_k
from components.config import GateConfig
from components.dataset import load_columns
from components.layout import metadata_path
from components.model import Recommender, SeenMovies

log = logging.getLogger(__name__)

K = 10
CURVE_MAX_K = 100
USER_CHUNK = 1024
METRICS_FILE = "metrics.json"
BLESSING_FILE = "blessing.json"
STARS_PER_UNIT = F.MAX_STARS - F.MIN_STARS

# Published / re-measured figures of the seed notebook's joint model on its split (ML-100k).
SEED_REFERENCE = {"system": "seed notebook (published)", "seed_hit@10": 0.022, "rmse": 0.25}


@dataclass
class Split:
    """One split as numpy columns."""

    users: np.ndarray
    movies: np.ndarray
    ratings: np.ndarray
    stars: np.ndarray

    @classmethod
    def load(cls, examples_dir: str, split: str) -> "Split":
        c = load_columns(examples_dir, split)
        return cls(c[F.USER_ID], c[F.MOVIE_ID], c[F.RATING], c[F.STARS])


@dataclass
class Gate:
    name: str
    value: float
    threshold: float
    comparison: str  # "<=" or ">="
    description: str

    @property
    def passed(self) -> bool:
        if self.comparison == "<=":
            return bool(self.value <= self.threshold + 1e-12)
        return bool(self.value >= self.threshold - 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "comparison": self.comparison,
            "passed": self.passed,
            "description": self.description,
        }


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    previous: dict[str, Any] | None
    gates: list[Gate]
    hit_curves: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def blessed(self) -> bool:
        return all(g.passed for g in self.gates)

    def blessing(self) -> dict[str, Any]:
        return {
            "blessed": self.blessed,
            "gates": [g.to_dict() for g in self.gates],
            "metrics": self.metrics,
        }

    def table(self) -> list[dict[str, Any]]:
        """Rows of the report: model, baselines, previous model and the seed's figures."""
        rows = [{"system": "model", **self.metrics}]
        for name, values in self.baselines.items():
            rows.append({"system": f"baseline: {name}", **values})
        if self.previous:
            rows.append(
                {
                    "system": f"previous blessed (v{self.previous['version']})",
                    **self.previous["metrics"],
                }
            )
        rows.append(dict(SEED_REFERENCE))
        return rows


# --- metrics over top-k lists ---


def topk_metrics(top_ids: np.ndarray, test: Split, k: int = K) -> dict[str, float]:
    return {
        f"hit@{k}": float(
            M.hit_rate_curve(top_ids, test.users, test.movies, test.stars, 5.0, k)[-1]
        ),
        f"recall@{k}": M.recall_at_k(top_ids, test.users, test.movies, test.stars, k, 4.0),
        f"ndcg@{k}": M.ndcg_at_k(top_ids, test.users, test.movies, test.stars, k, 4.0),
    }


def rating_metrics(predicted: np.ndarray, test: Split) -> dict[str, float]:
    error = M.rmse(predicted, test.ratings)
    return {"rmse": error, "rmse_stars": error * STARS_PER_UNIT}


def model_top_k(
    model: Recommender, k: int, seen: SeenMovies | None = None, chunk: int = USER_CHUNK
) -> np.ndarray:
    """[num_users, k] movie ids for every user id (row = user id), in batches of users."""
    rows = []
    for start in range(0, model.num_users, chunk):
        users = tf.range(start, min(start + chunk, model.num_users), dtype=tf.int32)
        _, ids = model.recommend(users, k=k, seen=seen)
        rows.append(np.asarray(ids))
    return np.concatenate(rows)


def evaluate_model(model: Recommender, train: Split, test: Split) -> tuple[dict, np.ndarray]:
    """The candidate's metrics and its hit@k curve (k = 1..100, seen excluded)."""
    seen = SeenMovies(train.users, train.movies, model.num_users)
    k_curve = min(CURVE_MAX_K, len(model.candidate_ids))
    top = model_top_k(model, k_curve, seen)
    metrics = topk_metrics(top, test)
    top_with_seen = model_top_k(model, K)
    metrics["seed_hit@10"] = float(
        M.hit_rate_curve(top_with_seen, test.users, test.movies, test.stars, 5.0, K)[-1]
    )
    predicted = (
        np.concatenate(
            [
                np.asarray(
                    model.predict_rating(test.users[i : i + 65536], test.movies[i : i + 65536])
                )
                for i in range(0, len(test.users), 65536)
            ]
        )
        if len(test.users)
        else np.zeros(0)
    )
    metrics.update(rating_metrics(predicted, test))
    curve = M.hit_rate_curve(top, test.users, test.movies, test.stars, 5.0, k_curve)
    return metrics, curve


def evaluate_baselines(
    train: Split, test: Split, num_rows: int, k_curve: int
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    popular = popularity_top_k(train.users, train.movies, num_rows, k_curve, exclude_seen=True)
    popular_metrics = topk_metrics(popular, test)
    popular_with_seen = popularity_top_k(train.users, train.movies, num_rows, K, exclude_seen=False)
    popular_metrics["seed_hit@10"] = float(
        M.hit_rate_curve(popular_with_seen, test.users, test.movies, test.stars, 5.0, K)[-1]
    )
    bias = BiasModel().fit(train.users, train.movies, train.ratings)
    baselines = {
        "popularity": popular_metrics,
        "global mean": rating_metrics(global_mean_predict(train.ratings, len(test.ratings)), test),
        "user+item bias": rating_metrics(bias.predict(test.users, test.movies), test),
    }
    curves = {
        "popularity": M.hit_rate_curve(popular, test.users, test.movies, test.stars, 5.0, k_curve)
    }
    return baselines, curves


def evaluate_saved_model(path: str, train: Split, test: Split, num_users: int) -> dict[str, float]:
    """Metrics of a previously exported model on the current split, through its signatures."""
    loaded = tf.saved_model.load(path)
    with open(metadata_path(path), encoding="utf-8") as handle:
        info = json.load(handle)
    rank = loaded.signatures[F.SIGNATURE_RANK]
    retrieve = loaded.signatures[F.SIGNATURE_RETRIEVE_EXCLUDING]
    known_users = min(num_users, int(info["num_users"]))
    known_movies = int(info["num_movies"])
    known = (test.users < known_users) & (test.movies < known_movies)
    predicted = np.full(len(test.users), float(np.mean(train.ratings)), dtype=np.float32)
    for i in range(0, int(known.sum()), 65536):
        idx = np.flatnonzero(known)[i : i + 65536]
        predicted[idx] = rank(
            user_id=tf.constant(test.users[idx], tf.int32),
            movie_id=tf.constant(test.movies[idx], tf.int32),
        )[F.OUT_RATING].numpy()
    metrics = rating_metrics(predicted, test)
    seen = SeenMovies(train.users, train.movies, num_users).ragged()
    top = np.zeros((num_users, int(info["k"])), dtype=np.int32)
    for start in range(1, known_users, USER_CHUNK):
        users = np.arange(start, min(start + USER_CHUNK, known_users), dtype=np.int32)
        excluded = seen[start : start + len(users)].to_tensor(0)
        out = retrieve(user_id=tf.constant(users), excluded_movie_ids=tf.cast(excluded, tf.int32))
        top[users] = out[F.OUT_MOVIE_IDS].numpy()
    metrics.update(topk_metrics(top, test, min(K, top.shape[1])))
    return metrics


def build_gates(
    metrics: dict[str, float],
    baselines: dict[str, dict[str, float]],
    previous: dict[str, Any] | None,
    config: GateConfig,
) -> list[Gate]:
    hit, rmse = metrics["hit@10"], metrics["rmse"]
    gates = [
        Gate("rmse", rmse, config.max_rmse, "<=", "RMSE (normalised) at most max_rmse"),
        Gate(
            "hit@10", hit, config.min_hit_rate, ">=", "hit@10 (seen excluded) at least min_hit_rate"
        ),
    ]
    if config.require_beat_baselines:
        gates.append(
            Gate(
                "hit@10 vs popularity",
                hit,
                baselines["popularity"]["hit@10"] + config.baseline_hit_rate_margin,
                ">=",
                "beats popularity's hit@10 by baseline_hit_rate_margin",
            )
        )
        gates.append(
            Gate(
                "rmse vs user+item bias",
                rmse,
                baselines["user+item bias"]["rmse"] - config.baseline_rmse_margin,
                "<=",
                "beats the bias model's RMSE by baseline_rmse_margin",
            )
        )
    if previous:
        version = previous["version"]
        gates.append(
            Gate(
                f"rmse vs blessed v{version}",
                rmse,
                previous["metrics"]["rmse"] + config.max_regression_rmse,
                "<=",
                "no worse than the previously blessed model by more than max_regression_rmse",
            )
        )
        gates.append(
            Gate(
                f"hit@10 vs blessed v{version}",
                hit,
                previous["metrics"]["hit@10"] - config.max_regression_hit_rate,
                ">=",
                "no worse than the previously blessed model by more than max_regression_hit_rate",
            )
        )
    return gates


def evaluate(
    model: Recommender,
    examples_dir: str,
    config: GateConfig,
    previous_model_path: str | None = None,
) -> EvaluationResult:
    """Everything the stage computes, as a plain result object (no files written)."""
    train = Split.load(examples_dir, F.TRAIN_SPLIT)
    test = Split.load(examples_dir, F.TEST_SPLIT)
    metrics, curve = evaluate_model(model, train, test)
    baselines, curves = evaluate_baselines(train, test, model.num_users, len(curve))
    previous = None
    if previous_model_path:
        version = int(os.path.basename(os.path.normpath(previous_model_path)))
        log.info("comparing with the previously blessed model %s", previous_model_path)
        previous = {
            "version": version,
            "path": previous_model_path,
            "metrics": evaluate_saved_model(previous_model_path, train, test, model.num_users),
        }
    gates = build_gates(metrics, baselines, previous, config)
    return EvaluationResult(metrics, baselines, previous, gates, {"model": curve, **curves})


def write_evaluation(
    result: EvaluationResult, out_dir: str, history: dict | None
) -> dict[str, str]:
    """metrics.json, blessing.json and the report (Markdown, HTML, PNGs) into `out_dir`."""
    from components.report import write_report

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, METRICS_FILE), "w", encoding="utf-8") as handle:
        json.dump(
            {"model": result.metrics, "baselines": result.baselines, "previous": result.previous},
            handle,
            indent=2,
        )
    with open(os.path.join(out_dir, BLESSING_FILE), "w", encoding="utf-8") as handle:
        json.dump(result.blessing(), handle, indent=2)
    paths = write_report(
        out_dir,
        result.table(),
        history,
        result.hit_curves,
        gates=[g.to_dict() for g in result.gates],
    )
    return {"metrics": os.path.join(out_dir, METRICS_FILE), **paths}


def run_evaluation(
    model_dir: str,
    examples_dir: str,
    out_dir: str,
    config: GateConfig,
    serving_model_dir: str = "",
    model_name: str = "",
) -> EvaluationResult:
    """Evaluate a trained model artifact; compare with the latest export when there is one."""
    from components.layout import latest_version_path
    from components.training import HISTORY_FILE

    model = Recommender.load_artifact(model_dir)
    previous = latest_version_path(serving_model_dir, model_name) if serving_model_dir else None
    result = evaluate(model, examples_dir, config, previous)
    history_path = os.path.join(model_dir, HISTORY_FILE)
    history = None
    if os.path.isfile(history_path):
        with open(history_path, encoding="utf-8") as handle:
            history = json.load(handle)
    write_evaluation(result, out_dir, history)
    verdict = "BLESSED" if result.blessed else "NOT BLESSED"
    log.info("evaluation: %s %s", verdict, json.dumps(result.metrics, sort_keys=True))
    for gate in result.gates:
        log.info(
            "gate %-28s %s %.4f %s %.4f",
            gate.name,
            "PASS" if gate.passed else "FAIL",
            gate.value,
            gate.comparison,
            gate.threshold,
        )
    return result


# --- KFP component ---


def evaluation_op(
    model: Input[Model],
    examples: Input[Dataset],
    gate_config: dict,
    serving_model_dir: str,
    model_name: str,
    metrics: Output[Metrics],
    blessing: Output[Artifact],
    report: Output[HTML],
) -> bool:
    """Evaluate on the test split against baselines; bless the model when every gate passes.

    Returns `blessed` as the task's `Output` parameter (what the DAG's condition reads)."""
    import logging
    import os
    import shutil

    from components.config import GateConfig
    from components.errors import exit_on_error
    from components.evaluation import run_evaluation

    logging.basicConfig(level=logging.INFO)
    with exit_on_error():
        result = run_evaluation(
            model.path,
            examples.path,
            blessing.path,
            GateConfig.from_dict(gate_config),
            serving_model_dir,
            model_name,
        )
        for name, value in result.metrics.items():
            metrics.log_metric(name, value)
        for baseline, values in result.baselines.items():
            for name, value in values.items():
                metrics.log_metric(f"{baseline}/{name}", value)
        shutil.copyfile(os.path.join(blessing.path, "report.html"), report.path)
        blessing.metadata["blessed"] = result.blessed
        return result.blessed
