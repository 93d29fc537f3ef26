"""Stage 4, evaluation: the trained SavedModel scored through its serving signatures, baselines
in the same run, gates, report.

The candidate is the artifact training wrote, used only through `retrieve_excluding` and `rank`
(`components/artifacts/saved_model.py` `ServedModel`), and the previously blessed model is scored by the same code: the
offline figures are the served model's by construction. Protocol (the standard one): each
test user's top-k over the whole catalogue, movies the user rated in training excluded. Metrics:
hit@10 over 5-star test ratings (the seed's metric without seen movies), recall@10 and NDCG@10
over test movies rated >= 4, the seed's own metric (seen included), and RMSE (normalised and in
stars). Baselines computed on the same split: popularity, global mean, a user+item bias model.
"""

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components import features as F
from components import progress, storage
from components.artifacts.examples import load_columns, load_stats
from components.artifacts.model_versions import latest_version_path
from components.artifacts.saved_model import ServedModel, read_history, read_metadata
from components.artifacts.vocabulary import load_vocabularies
from components.config import GateConfig
from components.errors import DataError
from components.evaluation import metrics as M
from components.evaluation.baselines import (
    EASE,
    EASE_LAMBDAS,
    BiasModel,
    choose_by_validation,
    ease_skip_reason,
    global_mean_predict,
    popularity_top_k,
)
from components.evaluation.gates import Gate, all_passed, build_gates
from components.ingestion.layouts import ML_100K

log = logging.getLogger(__name__)

K = 10

# Published / re-measured figures of the seed notebook's joint model on its split (ML-100k).
SEED_REFERENCE = {"system": "seed notebook (published)", "seed_hit@10": 0.022, "rmse": 0.25}


@dataclass
class Split:
    """One split as numpy columns."""

    users: np.ndarray
    movies: np.ndarray
    ratings: np.ndarray
    stars: np.ndarray
    stars_range: tuple[float, float] = F.DEFAULT_STARS_RANGE

    @property
    def stars_per_unit(self) -> float:
        return self.stars_range[1] - self.stars_range[0]

    @property
    def hit_stars(self) -> float:
        """A "hit" is a top-of-scale rating (5 stars on MovieLens; any implicit positive)."""
        return self.stars_range[1]

    @property
    def relevant_stars(self) -> float:
        """Relevant for recall and NDCG: the top quarter of the scale (>= 4 of 1..5 stars)."""
        low, high = self.stars_range
        return low + 0.75 * (high - low)

    @classmethod
    def load_optional(cls, examples_dir: str, split: str) -> "Split":
        """A split that may hold no rows (validation with validation_fraction 0)."""
        if load_stats(examples_dir)["rows"].get(split):
            return cls.load(examples_dir, split)
        empty = np.zeros(0, dtype=np.int32)
        return cls(empty, empty, np.zeros(0), np.zeros(0))

    @classmethod
    def load(cls, examples_dir: str, split: str) -> "Split":
        c = load_columns(examples_dir, split)
        low, high = load_stats(examples_dir).get("stars_range", F.DEFAULT_STARS_RANGE)
        return cls(c[F.USER_ID], c[F.MOVIE_ID], c[F.RATING], c[F.STARS], (low, high))

    def movies_by_user(self) -> dict[int, np.ndarray]:
        order = np.argsort(self.users, kind="stable")
        users, movies = self.users[order], self.movies[order]
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
        return {
            int(users[start]): movies[start:stop]
            for start, stop in zip(starts, np.r_[starts[1:], len(users)], strict=True)
        }


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    previous: dict[str, Any] | None
    gates: list[Gate]
    hit_curves: dict[str, np.ndarray] = field(default_factory=dict)
    slices: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # The seed notebook's published figures: shown only for the data they were measured on.
    reference: dict[str, Any] | None = None

    @property
    def blessed(self) -> bool:
        return all_passed(self.gates)

    def blessing(self) -> dict[str, Any]:
        return {
            "blessed": self.blessed,
            "gates": [g.to_dict() for g in self.gates],
            "metrics": self.metrics,
        }

    def metrics_json(self) -> dict[str, Any]:
        """metrics.json's content."""
        out = {"model": self.metrics, "baselines": self.baselines, "previous": self.previous}
        if self.reference:
            out["reference"] = self.reference
        return out

    def table(self) -> list[dict[str, Any]]:
        return table_rows(self.metrics_json())


def table_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the report from metrics.json's content: model, baselines, previous model, and
    the seed's published figures when the data is theirs (ML-100k)."""
    rows = [{"system": "model", **metrics["model"]}]
    rows += [{"system": f"baseline: {k}", **v} for k, v in metrics["baselines"].items()]
    previous = metrics.get("previous")
    if previous:
        rows.append({"system": f"previous blessed (v{previous['version']})", **previous["metrics"]})
    if metrics.get("reference"):
        rows.append(dict(metrics["reference"]))
    return rows


# --- metrics over top-k lists ---


def topk_metrics(top_ids: np.ndarray, test: Split, k: int = K) -> dict[str, float]:
    return {
        f"hit@{k}": float(
            M.hit_rate_curve(top_ids, test.users, test.movies, test.stars, test.hit_stars, k)[-1]
        ),
        f"recall@{k}": M.recall_at_k(
            top_ids, test.users, test.movies, test.stars, k, test.relevant_stars
        ),
        f"ndcg@{k}": M.ndcg_at_k(
            top_ids, test.users, test.movies, test.stars, k, test.relevant_stars
        ),
    }


def rating_metrics(predicted: np.ndarray, test: Split) -> dict[str, float]:
    """RMSE normalised and in stars (of the data set's own scale)."""
    error = M.rmse(predicted, test.ratings)
    return {"rmse": error, "rmse_stars": error * test.stars_per_unit}


@dataclass
class Scored:
    """One system's figures on the test split, and its top-k lists for the report's extras."""

    metrics: dict[str, float]
    top: np.ndarray  # [max test user + 1, k] movie ids (-1 / 0: nothing)
    curve: np.ndarray  # hit@k for k = 1..K


def score_served_model(model: ServedModel, seen: Split, test: Split, train: Split) -> Scored:
    """A SavedModel through its signatures: top-k (the `seen` pairs skipped), the seed's metric
    (nothing skipped), RMSE.

    Test users outside the examples' vocabulary (index 0: cold start) are left out of the
    top-k metrics; ratings of unknown users or movies get the training mean. Implicit-feedback
    models (no `rank` signature) have no RMSE."""
    users = np.unique(test.users)
    known = users[users > 0]
    by_user = seen.movies_by_user()
    empty = np.zeros(0, dtype=np.int32)
    reporter = progress.Reporter("users", 2 * len(known))
    top = np.full((int(test.users.max(initial=0)) + 1, model.k), -1, dtype=np.int32)
    top_with_seen = top.copy()
    for start in range(0, len(known), 4096):
        batch = known[start : start + 4096]
        top[batch] = model.top_k(batch, [by_user.get(int(u), empty) for u in batch])
        reporter.advance(len(batch))
        top_with_seen[batch] = model.top_k(batch)
        reporter.advance(len(batch))
    k = min(K, model.k)
    metrics = topk_metrics(top, test, k)
    metrics["seed_hit@10"] = float(
        M.hit_rate_curve(top_with_seen, test.users, test.movies, test.stars, test.hit_stars, k)[-1]
    )
    if model.rates:
        predicted = np.full(len(test.users), float(np.mean(train.ratings)), dtype=np.float32)
        scorable = (test.users > 0) & (test.movies > 0)
        predicted[scorable] = model.predict_rating(test.users[scorable], test.movies[scorable])
        metrics.update(rating_metrics(predicted, test))
    curve = M.hit_rate_curve(top, test.users, test.movies, test.stars, test.hit_stars, model.k)
    return Scored(metrics, top, curve)


def fit_ease(
    train: Split, validation: Split, num_rows: int, num_items: int
) -> tuple[EASE | None, str]:
    """EASE fitted on train with lambda chosen on validation hit@10 (its own train pairs
    skipped); (None, why) when the catalogue is too large or there is no validation split."""
    reason = ease_skip_reason(num_items)
    if reason:
        return None, reason
    if len(validation.users) == 0:
        return None, "EASE skipped: no validation split to choose its lambda on"
    ease = EASE(EASE_LAMBDAS[0]).fit(train.users, train.movies, num_rows, num_items)
    scores = {}
    for lam in EASE_LAMBDAS:
        top = ease.set_lambda(lam).top_k(K)
        scores[lam] = topk_metrics(top, validation)[f"hit@{K}"]
    chosen = choose_by_validation(scores)
    grid = ", ".join(f"{lam:g}: {value:.4f}" for lam, value in scores.items())
    return ease.set_lambda(chosen), f"EASE lambda {chosen:g} chosen on validation hit@10 ({grid})"


def evaluate_baselines(
    train: Split, validation: Split, test: Split, num_rows: int, explicit: bool = True
) -> tuple[dict[str, Scored | dict[str, float]], list[str]]:
    """Baselines on the same split: popularity and EASE (top-k, the train and validation pairs
    skipped, as for the model), global mean and user+item bias (RMSE). Also returns notes for
    the report (EASE's lambda, or why it was skipped)."""
    seen = concat_splits(train, validation)
    popular = popularity_top_k(
        train.users, train.movies, num_rows, K, exclude_seen=True, seen=(seen.users, seen.movies)
    )
    popular_metrics = topk_metrics(popular, test)
    popular_with_seen = popularity_top_k(train.users, train.movies, num_rows, K, exclude_seen=False)
    popular_metrics["seed_hit@10"] = float(
        M.hit_rate_curve(popular_with_seen, test.users, test.movies, test.stars, test.hit_stars, K)[
            -1
        ]
    )
    curve = M.hit_rate_curve(popular, test.users, test.movies, test.stars, test.hit_stars, K)
    bias = BiasModel().fit(train.users, train.movies, train.ratings) if explicit else None
    out: dict[str, Scored | dict[str, float]] = {
        "popularity": Scored(popular_metrics, popular, curve)
    }
    num_items = int(max(train.movies.max(initial=0), test.movies.max(initial=0))) + 1
    ease, note = fit_ease(train, validation, num_rows, num_items)
    if ease is not None:
        top = ease.top_k(K, validation.users, validation.movies)
        metrics = topk_metrics(top, test)
        out["EASE"] = Scored(
            metrics,
            top,
            M.hit_rate_curve(top, test.users, test.movies, test.stars, test.hit_stars, K),
        )
    if explicit:
        out["global mean"] = rating_metrics(
            global_mean_predict(train.ratings, len(test.ratings)), test
        )
        out["user+item bias"] = rating_metrics(bias.predict(test.users, test.movies), test)
    return out, [note]


def cold_start_notes(test: Split) -> list[str]:
    """How many test ratings fall outside the vocabularies (learned on train)."""
    return cold_start_note(int((test.users == 0).sum()), int((test.movies == 0).sum()))


def cold_start_note(users: int, movies: int) -> list[str]:
    if not users and not movies:
        return []
    return [
        f"{users} test rating(s) of users and {movies} of movies outside the training "
        "vocabularies: unknown users are left out of the top-k metrics (the served model gives "
        "them the most popular movies, flagged cold_start); unknown movies count as misses"
    ]


def concat_splits(*splits: Split) -> Split:
    return Split(
        *(
            np.concatenate([getattr(s, name) for s in splits])
            for name in ("users", "movies", "ratings", "stars")
        ),
        splits[0].stars_range,
    )


def beyond_accuracy(top: np.ndarray, test: Split, train: Split) -> dict[str, float]:
    """Catalogue coverage@10 and novelty@10 over the test users' lists."""
    rows = np.unique(test.users)
    candidates = int(np.unique(train.movies).size)
    return {
        "coverage@10": M.coverage_at_k(top, rows, candidates, K),
        "novelty@10": M.novelty_at_k(top, rows, train.users, train.movies, K),
    }


def sliced_tables(
    systems: dict[str, np.ndarray], train: Split, test: Split
) -> dict[str, list[dict[str, Any]]]:
    """hit@10 / recall@10 / NDCG@10 per user-activity bucket (training ratings) and per item
    popularity bucket, one row per (system, bucket)."""
    activity = np.bincount(train.users, minlength=int(test.users.max(initial=0)) + 1)
    item_counts = np.bincount(train.movies, minlength=int(test.movies.max(initial=0)) + 1)
    slices = {
        "by user activity (training ratings)": (
            M.bucket_by_edges(activity[test.users]),
            M.bucket_labels(),
        ),
        "by item popularity": (M.popularity_buckets(item_counts)[test.movies], M.POPULARITY_LABELS),
    }
    tables = {}
    for title, (row_slice, labels) in slices.items():
        rows = []
        for system, top in systems.items():
            by_bucket = M.sliced_topk_metrics(
                top, test.users, test.movies, test.stars, row_slice, labels, K,
                test.hit_stars, test.relevant_stars,
            )  # fmt: skip
            for label, values in by_bucket.items():
                counts = {k: int(v) for k, v in values.items() if k == "rows"}
                rows.append({"system": system, "bucket": label, **values, **counts})
        tables[title] = rows
    return tables


def evaluate(
    model_dir: str,
    examples_dir: str,
    config: GateConfig,
    previous_model_path: str | None = None,
) -> EvaluationResult:
    """Everything the stage computes, as a plain result object (no files written): a Beam job
    (`beam_pipeline.py`) on `config.evaluation_runner`, its options from
    `config.evaluation_beam_args`; the previously blessed model is copied here and checked first."""
    from components.evaluation.beam_pipeline import evaluate_beam

    stats = load_stats(examples_dir)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mtrec-previous-") as workdir:
        previous_local = None
        if previous_model_path:
            log.info("comparing with the previously blessed model %s", previous_model_path)
            with storage.local_copy(previous_model_path, workdir) as local:
                try:
                    ServedModel(local, load_vocabularies(examples_dir, stats))
                except DataError as err:  # another data set's model: nothing to compare with
                    notes.append(f"previous model not compared: {err}")
                else:
                    previous_local = local
                out = evaluate_beam(
                    model_dir,
                    examples_dir,
                    previous_local,
                    config.evaluation_runner,
                    list(config.evaluation_beam_args),
                )
        else:
            out = evaluate_beam(
                model_dir,
                examples_dir,
                None,
                config.evaluation_runner,
                list(config.evaluation_beam_args),
            )
    notes = [out["ease_note"], *cold_start_note(*out["cold"]), *notes]
    previous = None
    if out["previous"] is not None:
        previous = {
            "version": int(storage.basename(previous_model_path)),
            "path": previous_model_path,
            "metrics": out["previous"],
        }
    gates = build_gates(out["model"], out["baselines"], previous, config)
    return EvaluationResult(
        out["model"],
        out["baselines"],
        previous,
        gates,
        out["curves"],
        out["slices"],
        notes,
        dict(SEED_REFERENCE) if stats.get("layout", ML_100K.name) == ML_100K.name else None,
    )


def write_evaluation(
    result: EvaluationResult, out_dir: str, context: dict[str, Any] | None = None
) -> dict[str, str]:
    """metrics.json, blessing.json and the report (Markdown, HTML, PNGs), published together
    into `out_dir`. `context` feeds the report: history, data statistics, configuration,
    stage timings."""
    from components.evaluation.report import write_report

    with storage.atomic_output_dir(out_dir) as staging:
        with open(os.path.join(staging, F.METRICS_FILE), "w", encoding="utf-8") as handle:
            json.dump(result.metrics_json(), handle, indent=2)
        with open(os.path.join(staging, F.BLESSING_FILE), "w", encoding="utf-8") as handle:
            json.dump(result.blessing(), handle, indent=2)
        names = write_report(
            staging,
            result.table(),
            result.hit_curves,
            gates=[g.to_dict() for g in result.gates],
            slices=result.slices,
            notes=result.notes,
            **(context or {}),
        )
    return {key: os.path.join(out_dir, os.path.basename(path)) for key, path in names.items()}


def run_evaluation(
    model_dir: str,
    examples_dir: str,
    out_dir: str,
    config: GateConfig,
    serving_model_dir: str = "",
    model_name: str = F.DEFAULT_MODEL_NAME,
) -> EvaluationResult:
    """Evaluate a trained SavedModel; compare with the latest pushed version when there is one
    (local, s3:// or gs://)."""
    started = time.perf_counter()
    previous = latest_version_path(serving_model_dir, model_name) if serving_model_dir else None
    result = evaluate(model_dir, examples_dir, config, previous)
    info = read_metadata(model_dir)
    stats = load_stats(examples_dir)
    context = {
        "history": read_history(model_dir),
        "data": {
            "rows": stats["rows"],
            "users": stats["users"],
            "movies": stats["movies"],
            "vocabulary (users, movies)": vocabulary_description(stats),
            "dead letters": stats["invalid_rows"],
            "split": split_description(stats),
        },
        "configuration": {"training": info.get("training_config", {}), "gates": config.to_dict()},
        "timings": {
            "preprocessing (s)": stats.get("seconds"),
            "training (s)": info.get("train_seconds"),
            "evaluation (s)": round(time.perf_counter() - started, 2),
        },
    }
    write_evaluation(result, out_dir, context)
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


def vocabulary_description(stats: dict[str, Any]) -> str:
    """Vocabulary sizes, id kinds and the rows of rare or unseen ids, for the report."""
    vocab = stats["vocabulary"]
    kinds = vocab["id_kinds"]
    oov = sum(vocab["oov_user_rows"].values()) + sum(vocab["oov_movie_rows"].values())
    return (
        f"{vocab['users']:,} ({kinds['user']}), {vocab['movies']:,} ({kinds['movie']}); "
        f"min counts {vocab['min_user_count']}/{vocab['min_item_count']}; "
        f"{oov:,} rating(s) with an id outside them"
    )


def split_description(stats: dict[str, Any]) -> str:
    """How the data was split, for the report (stats.json's settings)."""
    mode = stats.get("split", "random")
    validation = f"validation {stats['validation_fraction']} of the rest"
    if mode == "last-k":
        return f"last-k: each user's {stats['last_k']} newest ratings; {validation}"
    test = f"test {stats['test_fraction']}"
    if mode == "temporal":
        return f"temporal: the newest rows ({test}); {validation}, the next newest"
    return f"random (seed {stats['split_seed']}, {test}, {validation})"


def read_blessing(blessing_dir: str) -> dict[str, Any]:
    return storage.read_json(os.path.join(blessing_dir, F.BLESSING_FILE), "an evaluation output")
