import json
import os

import numpy as np
import pytest
from components.export import export_saved_model

from components import features as F
from components.config import GateConfig
from components.evaluation import (
    Split,
    build_gates,
    evaluate,
    evaluate_model,
    evaluate_saved_model,
    write_evaluation,
)
from components.model import SeenMovies

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
        "description": gate["description"],
    }


def test_offline_metrics_equal_the_exported_models(tmp_path, small_examples, small_model):
    """The evaluation's numbers for the in-memory model and for its SavedModel (the serving path)
    must agree."""
    examples = small_examples["examples"]
    train = Split.load(examples, F.TRAIN_SPLIT)
    test = Split.load(examples, F.TEST_SPLIT)
    metrics, curve = evaluate_model(small_model, train, test)
    seen = SeenMovies(train.users, train.movies, small_model.num_users)
    path = export_saved_model(small_model, seen, str(tmp_path), "m")
    served = evaluate_saved_model(path, train, test, small_model.num_users)
    for name in ("hit@10", "recall@10", "ndcg@10", "rmse"):
        assert served[name] == pytest.approx(metrics[name], abs=1e-6), name
    assert curve[9] == pytest.approx(metrics["hit@10"])
    assert np.all(np.diff(curve) >= 0)


def test_evaluate_and_write(tmp_path, small_examples, small_model):
    result = evaluate(small_model, small_examples["examples"], GateConfig(max_rmse=0.0))
    assert not result.blessed
    assert set(result.baselines) == {"popularity", "global mean", "user+item bias"}
    assert {"hit@10", "recall@10", "ndcg@10", "seed_hit@10", "rmse", "rmse_stars"} <= set(
        result.metrics
    )
    assert result.metrics["rmse_stars"] == pytest.approx(4 * result.metrics["rmse"])
    paths = write_evaluation(result, str(tmp_path), {"rmse": [0.3, 0.25], "val_rmse": [0.31, 0.27]})
    with open(tmp_path / "blessing.json") as handle:
        blessing = json.load(handle)
    assert blessing["blessed"] is False
    assert [g["name"] for g in blessing["gates"] if not g["passed"]][0] == "rmse"
    with open(paths["markdown"]) as handle:
        report = handle.read()
    assert "baseline: popularity" in report and "NOT BLESSED" in report
    for name in ("metrics.json", "report.html", "hit_at_k.png", "training_curves.png"):
        assert os.path.getsize(tmp_path / name) > 0
