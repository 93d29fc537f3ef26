"""The whole pipeline on MovieLens 100k (../shared/data/ml-100k in CI; a generated set otherwise)."""

import os

import pytest

from components.config import GateConfig, PipelineConfig
from tests.conftest import SHARED_ML100K


@pytest.mark.slow
def test_mtrec_run_on_ml100k_is_blessed_and_beats_the_baselines(tmp_path, ml100k_dir, capsys):
    from pipeline import cli

    real = ml100k_dir == SHARED_ML100K
    argv = ["run", "--data-dir", ml100k_dir, "--output", str(tmp_path / "out"), "--require-blessed"]
    if not real:  # generated stand-in: check the plumbing, not the quality
        argv += ["--max-rmse", "1", "--min-hit-rate", "0", "--require-beat-baselines", "false"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| baseline: popularity |" in printed and "blessed:  True" in printed
    assert os.path.isfile(tmp_path / "out" / "serving" / "mtrec" / "1" / "saved_model.pb")
    if real:
        import json

        with open(tmp_path / "out" / "metrics.json") as handle:
            metrics = json.load(handle)
        model, baselines = metrics["model"], metrics["baselines"]
        # The seed split's figures: popularity ~0.14 hit@10, bias model ~0.237 RMSE.
        assert model["hit@10"] >= 0.20 > baselines["popularity"]["hit@10"]
        assert model["rmse"] <= 0.2300 < baselines["user+item bias"]["rmse"]
        defaults = GateConfig()
        assert model["rmse"] <= defaults.max_rmse and model["hit@10"] >= defaults.min_hit_rate
        assert PipelineConfig().preprocessing.test_fraction == 0.2
