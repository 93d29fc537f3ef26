"""The Beam evaluation (components/evaluation/beam_pipeline.py) against the in-process one."""

import numpy as np
import pytest

from components import features as F
from components.evaluation import statistics as S


def test_user_statistics_sum_to_the_in_process_metrics():
    from components.evaluation import metrics as M

    rng = np.random.default_rng(0)
    users = rng.integers(0, 6, 80)
    movies = rng.integers(0, 12, 80)
    stars = rng.integers(1, 6, 80).astype(float)
    top = np.stack([rng.permutation(12)[:5] for _ in range(6)]).astype(np.int32)
    top[0] = -1  # the cold-start row
    stats = {}
    for user in np.unique(users):
        rows = users == user
        stats = S.add(stats, S.user_topk_stats(top[user], movies[rows], stars[rows], 5, 5.0, 4.0))
    stats.update({"seed_hits": stats["hits"], "seed_hit_rows": stats["hit_rows"]})
    out = S.finish(stats, 5, explicit=False, stars_per_unit=4.0)
    assert out["metrics"]["hit@5"] == pytest.approx(
        M.hit_rate_curve(top, users, movies, stars, 5.0, 5)[-1]
    )
    assert out["metrics"]["recall@5"] == pytest.approx(
        M.recall_at_k(top, users, movies, stars, 5, 4.0)
    )
    assert out["metrics"]["ndcg@5"] == pytest.approx(M.ndcg_at_k(top, users, movies, stars, 5, 4.0))


def test_the_combiner_in_a_test_pipeline():
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that

    parts = [{"hits": np.array([1, 0, 2]), "users": 1}, {"hits": np.array([0, 3, 1]), "users": 2}]

    def check(result):
        (summed,) = result
        assert summed["hits"].tolist() == [1, 3, 3] and summed["users"] == 3

    with TestPipeline(runner="DirectRunner") as pipeline:
        combined = pipeline | beam.Create(parts) | beam.CombineGlobally(S.StatsCombineFn())
        assert_that(combined, check)


def test_beam_scoring_gives_the_in_process_figures(small_examples, small_saved_model):
    from components.artifacts.examples import load_stats
    from components.artifacts.saved_model import ServedModel
    from components.artifacts.vocabulary import load_vocabularies
    from components.evaluation.beam_pipeline import score_model_beam
    from components.evaluation.evaluator import Split, concat_splits, score_served_model

    examples = small_examples["examples"]
    train = Split.load(examples, F.TRAIN_SPLIT)
    validation = Split.load_optional(examples, F.VALIDATION_SPLIT)
    test = Split.load(examples, F.TEST_SPLIT)
    vocab = load_vocabularies(examples, load_stats(examples))
    expected = score_served_model(
        ServedModel(small_saved_model, vocab), concat_splits(train, validation), test, train
    )
    got = score_model_beam(small_saved_model, examples, batch=7)  # several batches
    assert set(got["metrics"]) == set(expected.metrics)
    _assert_same(got, expected, train, validation, test, vocab)


def _assert_same(got, expected, train, validation, test, vocab):
    """The model's figures and curve, and popularity's, to 1e-6."""
    from components.evaluation.evaluator import evaluate_baselines

    for name, value in expected.metrics.items():
        assert got["metrics"][name] == pytest.approx(value, abs=1e-6), name
    np.testing.assert_allclose(got["curve"], expected.curve, atol=1e-6)
    num_rows = max(vocab.users.rows, int(test.users.max(initial=0)) + 1)
    baselines, _ = evaluate_baselines(train, validation, test, num_rows)
    popularity = baselines["popularity"]
    for name, value in popularity.metrics.items():
        assert got["baselines"]["popularity"]["metrics"][name] == pytest.approx(value, abs=1e-6)
    np.testing.assert_allclose(got["baselines"]["popularity"]["curve"], popularity.curve, atol=1e-6)


@pytest.mark.slow
def test_beam_scoring_gives_the_in_process_figures_on_ml100k(tmp_path, ml100k_dir):
    """The real ML-100k (one training epoch: the figures, not the quality, are compared)."""
    from components.artifacts.examples import load_stats
    from components.artifacts.saved_model import ServedModel
    from components.artifacts.vocabulary import load_vocabularies
    from components.config import DEFAULT_TRAINING, PreprocessingConfig
    from components.evaluation.beam_pipeline import score_model_beam
    from components.evaluation.evaluator import Split, concat_splits, score_served_model
    from components.ingestion.ingest import run_ingestion
    from components.preprocessing.pipeline import run_preprocessing
    from components.training.trainer import run_training

    ratings, movies = str(tmp_path / "ratings"), str(tmp_path / "movies")
    examples, model = str(tmp_path / "examples"), str(tmp_path / "model")
    run_ingestion(ml100k_dir, ratings, movies)
    run_preprocessing(ratings, examples, PreprocessingConfig())
    run_training(examples, model, DEFAULT_TRAINING.replace(epochs=1))
    train = Split.load(examples, F.TRAIN_SPLIT)
    validation = Split.load_optional(examples, F.VALIDATION_SPLIT)
    test = Split.load(examples, F.TEST_SPLIT)
    vocab = load_vocabularies(examples, load_stats(examples))
    expected = score_served_model(
        ServedModel(model, vocab), concat_splits(train, validation), test, train
    )
    _assert_same(score_model_beam(model, examples), expected, train, validation, test, vocab)
