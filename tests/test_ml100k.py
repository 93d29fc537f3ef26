"""The whole pipeline on the real MovieLens 100k (../shared/data/ml-100k; skipped without it)."""

import json
import os

import pytest

from components.config import GateConfig


@pytest.mark.slow
def test_mtrec_run_on_ml100k_is_blessed_and_beats_the_baselines(tmp_path, ml100k_dir, capsys):
    from pipeline import cli

    argv = ["run", "--data-dir", ml100k_dir, "--output", str(tmp_path / "out"), "--require-blessed"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| baseline: popularity |" in printed and "blessed:   yes" in printed
    assert len(printed.strip().splitlines()) <= 40
    assert os.path.isfile(tmp_path / "out" / "serving" / "mtrec" / "1" / "saved_model.pb")
    with open(tmp_path / "out" / "metrics.json") as handle:
        metrics = json.load(handle)
    model, baselines = metrics["model"], metrics["baselines"]
    # 72k training rows (80k less the validation split): popularity ~0.12 hit@10, bias ~0.236.
    assert model["hit@10"] >= 0.20 > baselines["popularity"]["hit@10"]
    assert model["rmse"] <= 0.2300 < baselines["user+item bias"]["rmse"]
    defaults = GateConfig()
    assert model["rmse"] <= defaults.max_rmse and model["hit@10"] >= defaults.min_hit_rate
