"""Train and evaluate several configurations on one split, in one process: the seed's three
variants next to ours (`mtrec compare`), and the multi-seed quality benchmark (bench/quality.py).

It reuses the stages' logic directly (no DAG): the comparison is an experiment, not a deployment.
"""

import logging
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

from components import features as F
from components.config import (
    DEFAULT_TRAINING,
    SEED_TRAINING,
    VARIANTS,
    PreprocessingConfig,
    TrainingConfig,
)
from components.evaluation.evaluator import (
    Scored,
    Split,
    concat_splits,
    evaluate_baselines,
    score_served_model,
)

log = logging.getLogger(__name__)


def prepare_examples(data_dir: str, work_dir: str, config: PreprocessingConfig) -> str:
    """Ingest + preprocess once; returns the examples folder (reused when already there)."""
    from components.ingestion.ingest import run_ingestion
    from components.preprocessing.pipeline import run_preprocessing

    examples = os.path.join(work_dir, "examples")
    if os.path.isfile(os.path.join(examples, F.STATS_FILE)):
        from components.artifacts.examples import load_stats

        if "vocabulary" in load_stats(examples):  # else made by a version without vocabularies
            return examples
        log.info("%s was made by an older version: preprocessing again", examples)
        shutil.rmtree(work_dir)
    ratings, movies = os.path.join(work_dir, "ratings"), os.path.join(work_dir, "movies")
    run_ingestion(data_dir, ratings, movies)
    run_preprocessing(ratings, examples, config)
    return examples


def variant_configs(base: TrainingConfig, prefix: str) -> dict[str, TrainingConfig]:
    """The seed's three variants of a configuration: each loss term on or off."""
    configs = {}
    for name, (ranking_on, retrieval_on) in VARIANTS.items():
        configs[f"{prefix} {name}"] = base.replace(
            ranking_weight=base.ranking_weight * ranking_on,
            retrieval_weight=base.retrieval_weight * retrieval_on,
        )
    return configs


@dataclass
class Outcome:
    name: str
    metrics: dict[str, float]
    history: dict[str, list[float]]
    curve: np.ndarray
    seconds: float


def train_and_evaluate(examples_dir: str, configs: dict[str, TrainingConfig]) -> list[Outcome]:
    """Each configuration trained and scored exactly as the pipeline does: through the serving
    SavedModel training writes."""
    import tempfile

    from components.artifacts.examples import load_stats
    from components.artifacts.saved_model import ServedModel
    from components.artifacts.vocabulary import load_vocabularies
    from components.training.trainer import run_training

    vocabularies = load_vocabularies(examples_dir, load_stats(examples_dir))
    train = Split.load(examples_dir, F.TRAIN_SPLIT)
    seen = concat_splits(train, Split.load_optional(examples_dir, F.VALIDATION_SPLIT))
    test = Split.load(examples_dir, F.TEST_SPLIT)
    outcomes = []
    for name, config in configs.items():
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="mtrec-experiment-") as workdir:
            model_dir = os.path.join(workdir, "model")
            history = run_training(examples_dir, model_dir, config)
            seconds = time.perf_counter() - started
            scored = score_served_model(ServedModel(model_dir, vocabularies), seen, test, train)
        log.info("%s: %s (%.1fs)", name, scored.metrics, seconds)
        outcomes.append(Outcome(name, scored.metrics, history, scored.curve, seconds))
    return outcomes


def baseline_rows(examples_dir: str, num_rows: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    train = Split.load(examples_dir, F.TRAIN_SPLIT)
    validation = Split.load_optional(examples_dir, F.VALIDATION_SPLIT)
    test = Split.load(examples_dir, F.TEST_SPLIT)
    baselines, _ = evaluate_baselines(train, validation, test, num_rows)
    rows, curves = [], {}
    for name, value in baselines.items():
        if isinstance(value, Scored):
            rows.append({"system": f"baseline: {name}", **value.metrics})
            curves[name] = value.curve
        else:
            rows.append({"system": f"baseline: {name}", **value})
    return rows, curves


def compare_variants(data_dir: str, out_dir: str, epochs: int | None = None) -> list[dict]:
    """The seed's table (its configuration, three variants) next to ours, plus baselines; writes a
    report into `out_dir` and returns the table rows."""
    from components.artifacts.examples import load_stats
    from components.evaluation.report import write_report

    examples = prepare_examples(data_dir, out_dir, PreprocessingConfig())
    configs = {
        **variant_configs(SEED_TRAINING, "seed"),
        **variant_configs(DEFAULT_TRAINING, "mtrec"),
    }
    if epochs:
        configs = {k: v.replace(epochs=epochs) for k, v in configs.items()}
    outcomes = train_and_evaluate(examples, configs)
    rows = [{"system": o.name, **o.metrics, "fit_seconds": o.seconds} for o in outcomes]
    stats = load_stats(examples)
    extra, curves = baseline_rows(examples, stats["vocabulary"]["users"] + 1)
    rows += extra
    write_report(
        out_dir,
        rows,
        {**{o.name: o.curve for o in outcomes if "rating-only" not in o.name}, **curves},
        history=next(o.history for o in outcomes if o.name == "mtrec joint"),
        title="mtrec: the seed's variants next to ours",
    )
    return rows
