import os

import pytest

from components.config import DEFAULT_TRAINING, SEED_TRAINING
from pipeline.experiments import compare_variants, variant_configs


def test_variant_configs_switch_loss_terms():
    variants = variant_configs(DEFAULT_TRAINING, "mtrec")
    assert variants["mtrec joint"] == DEFAULT_TRAINING
    assert variants["mtrec rating-only"].retrieval_weight == 0
    assert variants["mtrec rating-only"].ranking_weight == DEFAULT_TRAINING.ranking_weight
    assert variants["mtrec retrieval-only"].ranking_weight == 0
    seed = variant_configs(SEED_TRAINING, "seed")
    assert (seed["seed joint"].ranking_weight, seed["seed joint"].retrieval_weight) == (1.0, 1.0)


@pytest.mark.slow
def test_compare_trains_the_seed_variants_next_to_ours(tmp_path, small_data_dir):
    rows = compare_variants(small_data_dir, str(tmp_path), epochs=1)
    systems = [row["system"] for row in rows]
    assert systems == [
        "seed rating-only",
        "seed retrieval-only",
        "seed joint",
        "mtrec rating-only",
        "mtrec retrieval-only",
        "mtrec joint",
        "baseline: popularity",
        "baseline: EASE",
        "baseline: global mean",
        "baseline: user+item bias",
    ]
    for row in rows[:6]:
        assert 0.0 <= row["hit@10"] <= 1.0 and row["rmse"] > 0
    with open(os.path.join(tmp_path, "report.md")) as handle:
        assert "| seed joint |" in handle.read()
