"""The Beam evaluation (components/evaluation/beam_pipeline.py) against the in-process one."""

import numpy as np
import pytest

from components.evaluation import statistics as S


def test_batch_sums_add_up_to_the_in_process_metrics_and_slices():
    from components.evaluation import metrics as M

    rng = np.random.default_rng(1)
    users, movies = rng.integers(0, 9, 200), rng.integers(0, 15, 200)
    stars = rng.integers(1, 6, 200).astype(float)
    top = np.stack([rng.permutation(15)[:10] for _ in range(9)]).astype(np.int32)
    row_slice = rng.integers(0, 3, 200)
    sums = {}
    for part in (users < 4, users >= 4):  # two batches of users
        distinct = np.unique(users[part])
        rows = np.searchsorted(distinct, users[part])
        batch = S.topk_sums("m/", top[distinct], rows, movies[part], stars[part], 10, 5.0, 4.0)
        batch.update(
            S.sliced_sums(
                "m/", top[distinct], rows, movies[part], stars[part],
                {"t": (row_slice[part], 3)}, 5.0, 4.0,
            )
        )  # fmt: skip
        sums = S.add(sums, batch)
    got = S.topk_figures(sums, "m/", 10)
    assert got["hit@10"] == pytest.approx(
        M.hit_rate_curve(top, users, movies, stars)[-1], abs=1e-12
    )
    assert got["recall@10"] == pytest.approx(M.recall_at_k(top, users, movies, stars), abs=1e-12)
    assert got["ndcg@10"] == pytest.approx(M.ndcg_at_k(top, users, movies, stars), abs=1e-12)
    expected = M.sliced_topk_metrics(top, users, movies, stars, row_slice, ("a", "b", "c"))
    rows = S.sliced_rows(sums, ["m"], {"t": ("a", "b", "c")})["t"]
    for row in rows:
        for name, value in expected[row["bucket"]].items():
            assert row[name] == pytest.approx(value, abs=1e-12), (row["bucket"], name)


def test_the_bias_model_from_catalogue_sums_is_the_alternating_fit():
    from components.evaluation.baselines import DEFAULT_USER_REG, BiasModel, bias_item_sweeps

    rng = np.random.default_rng(0)
    u, m, r = rng.integers(0, 30, 500), rng.integers(1, 40, 500), rng.random(500)
    reference = BiasModel().fit(u, m, r)
    width, mu = 41, r.mean()
    c = np.zeros((30, width))
    np.add.at(c, (u, m), 1)
    n = np.bincount(u, minlength=30)
    w = 1 / (n + DEFAULT_USER_REG)
    residual = np.bincount(m, weights=r - mu, minlength=width)
    terms = c.T @ (w * (np.bincount(u, weights=r, minlength=30) - n * mu))
    previous, items = bias_item_sweeps(
        np.bincount(m, minlength=width), residual, terms, (c * w[:, None]).T @ c, 10
    )
    np.testing.assert_allclose(items[: reference.item_bias.size], reference.item_bias, atol=1e-12)
    user = (np.bincount(u, weights=r - mu, minlength=30) - c @ previous) * w
    np.testing.assert_allclose(user, reference.user_bias, atol=1e-12)


def test_ease_from_the_gram_matrix_is_ease():
    from components.evaluation.baselines import EASE

    rng = np.random.default_rng(2)
    u, m = rng.integers(0, 20, 150), rng.integers(1, 12, 150)
    fitted = EASE(200.0).fit(u, m, 20, 12)
    x = np.zeros((20, 12))
    x[u, m] = 1
    np.testing.assert_array_equal(EASE(200.0).fit_gram(x.T @ x).weights, fitted.weights)


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


def assert_same_evaluation(got, expected):
    """Every figure the stage reports, to 1e-6: the model's, the baselines', the previous
    model's, the slices, the curves, the gates and the notes."""

    def close(a, b, where):
        assert set(a) == set(b), where
        for name, value in b.items():
            assert a[name] == pytest.approx(value, abs=1e-6), f"{where}: {name}"

    close(got.metrics, expected.metrics, "model")
    assert list(got.baselines) == list(expected.baselines)
    for name, values in expected.baselines.items():
        close(got.baselines[name], values, name)
    assert (got.previous is None) == (expected.previous is None)
    if expected.previous:
        close(got.previous["metrics"], expected.previous["metrics"], "previous")
    assert list(got.hit_curves) == list(expected.hit_curves)
    for name, curve in expected.hit_curves.items():
        np.testing.assert_allclose(got.hit_curves[name], curve, atol=1e-6, err_msg=name)
    assert list(got.slices) == list(expected.slices)
    for title, rows in expected.slices.items():
        assert len(got.slices[title]) == len(rows)
        for mine, theirs in zip(got.slices[title], rows, strict=True):
            close(mine, theirs, f"{title} {theirs['system']} {theirs['bucket']}")
    assert [g.name for g in got.gates] == [g.name for g in expected.gates]
    for mine, theirs in zip(got.gates, expected.gates, strict=True):
        assert mine.value == pytest.approx(theirs.value, abs=1e-6), theirs.name
        assert mine.threshold == pytest.approx(theirs.threshold, abs=1e-6), theirs.name
        assert mine.passed == theirs.passed
    assert got.notes == expected.notes


def test_the_beam_evaluation_gives_the_in_process_figures(
    tmp_path, small_examples, small_saved_model
):
    """Small data, several batches of users, the previous-model comparison included."""
    import shutil

    from components.config import GateConfig
    from components.evaluation import beam_pipeline
    from components.evaluation.evaluator import evaluate
    from components.evaluation.reference import evaluate_in_process

    previous = tmp_path / "serving" / "mtrec" / "3"
    shutil.copytree(small_saved_model, previous)
    examples = small_examples["examples"]
    expected = evaluate_in_process(small_saved_model, examples, GateConfig(), str(previous))
    original = beam_pipeline.BATCH_USERS
    beam_pipeline.BATCH_USERS = 7
    try:
        got = evaluate(small_saved_model, examples, GateConfig(), str(previous))
    finally:
        beam_pipeline.BATCH_USERS = original
    assert got.previous["version"] == 3
    assert_same_evaluation(got, expected)


@pytest.mark.slow
def test_the_beam_evaluation_gives_the_in_process_figures_on_ml100k(tmp_path, ml100k_examples):
    """The real ML-100k (one training epoch: the figures, not the quality, are compared), EASE
    and the bias model included, the previous-model comparison too."""
    import shutil

    from components.config import DEFAULT_TRAINING, GateConfig
    from components.evaluation.evaluator import evaluate
    from components.evaluation.reference import evaluate_in_process
    from components.training.trainer import run_training

    examples, model = ml100k_examples, str(tmp_path / "model")
    run_training(examples, model, DEFAULT_TRAINING.replace(epochs=1))
    previous = tmp_path / "serving" / "mtrec" / "1"
    shutil.copytree(model, previous)
    expected = evaluate_in_process(model, examples, GateConfig(), str(previous))
    got = evaluate(model, examples, GateConfig(), str(previous))
    assert "EASE" in got.baselines and "user+item bias" in got.baselines
    assert_same_evaluation(got, expected)


def test_evaluation_runner_flags_map_to_the_config():
    from components.config import GateConfig
    from pipeline import cli

    args = cli.build_parser().parse_args(
        [
            "run", "--evaluation-runner", "DirectRunner",
            "--evaluation-beam-arg=--direct_num_workers=2", "--evaluation-beam-arg=--max_num_workers=3",
        ]
    )  # fmt: skip
    gates = cli.config_from_args(args).gates
    assert gates.evaluation_runner == "DirectRunner"
    assert gates.evaluation_beam_args == ("--direct_num_workers=2", "--max_num_workers=3")
    # As the KFP evaluation component receives it: a dict parameter.
    assert GateConfig.from_dict(gates.to_dict()) == gates


def test_mtrec_evaluate_passes_beam_args(tmp_path, small_examples, small_saved_model, capsys):
    import json
    import os

    from pipeline import cli

    out = str(tmp_path / "evaluation")
    argv = ["evaluate", "--model", small_saved_model, "--examples", small_examples["examples"]]
    argv += [
        "--output",
        out,
        "--beam-args",
        "--direct_num_workers=1",
        "--direct_running_mode=in_memory",
    ]
    assert cli.main(argv) == 0
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as handle:
        assert "popularity" in json.load(handle)["baselines"]
    assert "blessed:" in capsys.readouterr().out


def test_above_the_item_limit_the_bias_model_is_fitted_in_rounds(
    monkeypatch, small_examples, small_saved_model
):
    """No Gram matrix (EASE skipped): the bias model's sweeps run as rounds over the batches and
    give the same RMSE."""
    from components.config import GateConfig
    from components.evaluation import beam_pipeline
    from components.evaluation.evaluator import evaluate
    from components.evaluation.reference import evaluate_in_process

    examples = small_examples["examples"]
    expected = evaluate_in_process(small_saved_model, examples, GateConfig())
    monkeypatch.setattr(beam_pipeline, "EASE_MAX_ITEMS", 1)
    got = evaluate(small_saved_model, examples, GateConfig())
    assert "EASE" not in got.baselines and got.notes[0].startswith("EASE skipped")
    for name in ("user+item bias", "global mean"):
        for figure, value in expected.baselines[name].items():
            assert got.baselines[name][figure] == pytest.approx(value, abs=1e-6), (name, figure)


@pytest.mark.slow
def test_dask_runner_gives_the_figures_direct_runner_gives(
    small_examples, small_saved_model, dask_cluster
):
    """The same evaluation graph on a dask.distributed cluster (a scheduler and two workers on
    loopback): every metric, baseline, slice and gate equal to DirectRunner's."""
    from components.config import GateConfig
    from components.evaluation.evaluator import evaluate

    examples = small_examples["examples"]
    direct = evaluate(small_saved_model, examples, GateConfig())
    on_dask = GateConfig(
        evaluation_runner="DaskRunner",
        evaluation_beam_args=(f"--dask_client_address={dask_cluster}",),
    )
    assert_same_evaluation(evaluate(small_saved_model, examples, on_dask), direct)


def test_above_the_item_limit_dask_runner_is_refused_before_it_runs(
    monkeypatch, small_examples, small_saved_model
):
    """The bias model's sweeps are a chain of side inputs: DaskRunner would recompute each one's
    producers in every reading task, exponentially in the sweeps (bench/dask_limits.py). The
    graph is refused while it is built, before any cluster is started or data read."""
    pytest.importorskip("distributed")
    from components.evaluation import beam_pipeline

    monkeypatch.setattr(beam_pipeline, "EASE_MAX_ITEMS", 1)
    with pytest.raises(NotImplementedError, match="does not run on DaskRunner"):
        beam_pipeline.evaluate_beam(
            small_saved_model, small_examples["examples"], runner="DaskRunner"
        )
