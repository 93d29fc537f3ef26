import json
import os

import numpy as np
import pytest

from components import features as F
from components.artifacts.examples import load_stats
from components.artifacts.saved_model import ServedModel, export_saved_model
from components.artifacts.vocabulary import load_vocabularies
from components.config import GateConfig
from components.evaluation import metrics as M
from components.evaluation.evaluator import (
    Split,
    evaluate,
    score_served_model,
    topk_metrics,
    write_evaluation,
)
from components.evaluation.gates import build_gates
from components.training.seen_movies import SeenMovies

METRICS = {"hit@10": 0.25, "rmse": 0.228}
BASELINES = {"popularity": {"hit@10": 0.14}, "user+item bias": {"rmse": 0.2366}}


def _verdicts(gates):
    return {g.name: g.passed for g in gates}


def test_gates_pass_and_fail_on_thresholds():
    gates = build_gates(METRICS, BASELINES, None, GateConfig())
    assert all(g.passed for g in gates)
    assert len(gates) == 4
    strict = GateConfig(max_rmse=0.2, min_hit_rate=0.3)
    verdicts = _verdicts(build_gates(METRICS, BASELINES, None, strict))
    assert verdicts == {
        "rmse": False,
        "hit@10": False,
        "hit@10 vs popularity": True,
        "rmse vs user+item bias": True,
    }


def test_gates_require_a_margin_over_baselines():
    config = GateConfig(baseline_hit_rate_margin=0.2, baseline_rmse_margin=0.01)
    verdicts = _verdicts(build_gates(METRICS, BASELINES, None, config))
    assert verdicts["hit@10 vs popularity"] is False  # 0.25 < 0.14 + 0.2
    assert verdicts["rmse vs user+item bias"] is False  # 0.228 > 0.2366 - 0.01
    relaxed = GateConfig(require_beat_baselines=False)
    assert len(build_gates(METRICS, BASELINES, None, relaxed)) == 2


def test_the_ease_gate_needs_a_margin_and_only_when_ease_ran():
    baselines = {**BASELINES, "EASE": {"hit@10": 0.245}}
    verdicts = _verdicts(
        build_gates(METRICS, baselines, None, GateConfig(ease_hit_rate_margin=0.01))
    )
    assert verdicts["hit@10 vs EASE"] is False  # 0.25 < 0.245 + 0.01
    verdicts = _verdicts(
        build_gates(METRICS, baselines, None, GateConfig(ease_hit_rate_margin=0.0))
    )
    assert verdicts["hit@10 vs EASE"] is True
    assert "hit@10 vs EASE" not in _verdicts(build_gates(METRICS, BASELINES, None, GateConfig()))


def test_gates_against_the_previous_blessed_model():
    previous = {"version": 3, "metrics": {"hit@10": 0.30, "rmse": 0.21}}
    gates = build_gates(METRICS, BASELINES, previous, GateConfig())
    verdicts = _verdicts(gates)
    assert verdicts["rmse vs blessed v3"] is False  # 0.228 > 0.21 + 0.01
    assert verdicts["hit@10 vs blessed v3"] is False  # 0.25 < 0.30 - 0.02
    lenient = GateConfig(max_regression_rmse=0.05, max_regression_hit_rate=0.1)
    assert all(g.passed for g in build_gates(METRICS, BASELINES, previous, lenient))
    gate = next(g for g in gates if g.name == "rmse vs blessed v3").to_dict()
    assert gate == {
        "name": "rmse vs blessed v3",
        "value": 0.228,
        "threshold": pytest.approx(0.22),
        "comparison": "<=",
        "passed": False,
        "description": "no worse than the previously blessed model by more than max_regression_rmse",
    }


def test_offline_metrics_are_the_served_models(tmp_path, small_examples, small_model):
    """Scored through the SavedModel's signatures, the figures equal the in-memory model's."""
    import tensorflow as tf

    examples = small_examples["examples"]
    train = Split.load(examples, F.TRAIN_SPLIT)
    test = Split.load(examples, F.TEST_SPLIT)
    seen = SeenMovies(train.users, train.movies, small_model.num_users)
    vocab = load_vocabularies(examples, load_stats(examples))
    path = export_saved_model(small_model, seen, vocab, str(tmp_path), "m")
    scored = score_served_model(ServedModel(path, vocab), train, test, train)
    served, curve = scored.metrics, scored.curve

    users = np.arange(small_model.num_users, dtype=np.int32)
    _, top = small_model.recommend(tf.constant(users), seen=seen)
    expected = topk_metrics(np.asarray(top), test)
    predicted = small_model.predict_rating(tf.constant(test.users), tf.constant(test.movies))
    known = (test.users > 0) & (test.movies > 0)  # unknown ids get the training mean
    predicted = np.where(known, np.asarray(predicted), np.mean(train.ratings))
    expected["rmse"] = M.rmse(predicted, test.ratings)
    for name in ("hit@10", "recall@10", "ndcg@10", "rmse"):
        assert served[name] == pytest.approx(expected[name], abs=1e-6), name
    assert curve[9] == pytest.approx(served["hit@10"])
    assert np.all(np.diff(curve) >= 0)


def test_evaluate_and_write(tmp_path, small_examples, small_saved_model):
    result = evaluate(small_saved_model, small_examples["examples"], GateConfig(max_rmse=0.0))
    assert not result.blessed
    assert set(result.baselines) == {"popularity", "EASE", "global mean", "user+item bias"}
    assert result.notes[0].startswith("EASE lambda ")
    assert {"coverage@10", "novelty@10"} <= set(result.metrics)
    assert set(result.slices) == {"by user activity (training ratings)", "by item popularity"}
    assert {"hit@10", "recall@10", "ndcg@10", "seed_hit@10", "rmse", "rmse_stars"} <= set(
        result.metrics
    )
    assert result.metrics["rmse_stars"] == pytest.approx(4 * result.metrics["rmse"])
    context = {"history": {"rmse": [0.3, 0.25], "val_rmse": [0.31, 0.27]}, "data": {"rows": 3}}
    paths = write_evaluation(result, str(tmp_path / "eval"), context)
    with open(tmp_path / "eval" / "blessing.json") as handle:
        blessing = json.load(handle)
    assert blessing["blessed"] is False
    assert [g["name"] for g in blessing["gates"] if not g["passed"]][0] == "rmse"
    with open(paths["markdown"]) as handle:
        report = handle.read()
    assert "baseline: popularity" in report and "NOT BLESSED" in report and "## Data" in report
    for name in ("metrics.json", "report.html", "hit_at_k.png", "training_curves.png"):
        assert os.path.getsize(tmp_path / "eval" / name) > 0


def test_the_previous_model_is_scored_by_the_same_code(tmp_path, small_examples, small_saved_model):
    import shutil

    base = tmp_path / "serving" / "m"
    shutil.copytree(small_saved_model, base / "4")
    result = evaluate(small_saved_model, small_examples["examples"], GateConfig(), str(base / "4"))
    assert result.previous["version"] == 4
    for name in ("hit@10", "rmse"):
        assert result.previous["metrics"][name] == pytest.approx(result.metrics[name], abs=1e-9)


def test_ease_is_skipped_with_a_reason_on_a_large_catalogue():
    from components.evaluation.baselines import EASE_MAX_ITEMS
    from components.evaluation.evaluator import fit_ease

    ids = np.array([1, 2], dtype=np.int32)
    train = Split(ids, np.array([1, EASE_MAX_ITEMS + 5], dtype=np.int32), np.zeros(2), np.zeros(2))
    ease, note = fit_ease(train, train, num_rows=3, num_items=EASE_MAX_ITEMS + 6)
    assert ease is None and note.startswith("EASE skipped:") and str(EASE_MAX_ITEMS) in note
    ease, note = fit_ease(train, Split(ids[:0], ids[:0], np.zeros(0), np.zeros(0)), 3, 10)
    assert ease is None and "no validation split" in note
