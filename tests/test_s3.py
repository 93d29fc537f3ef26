"""The cluster's storage path, against a real S3-protocol server (moto) on loopback: a whole
`mtrec run` reading its data from s3:// and pushing the blessed model to s3://."""

import os

import pytest

from components import storage
from components.config import GateConfig, PipelineConfig, TrainingConfig
from components.layout import SAVED_MODEL_FILE, list_versions


def _upload_folder(local: str, remote: str) -> None:
    for name in os.listdir(local):
        storage.upload_file(os.path.join(local, name), storage.join(remote, name))


@pytest.mark.slow
def test_mtrec_run_reads_and_pushes_through_s3(tmp_path, s3_bucket, small_data_dir):
    from pipeline.runners import run_local

    _upload_folder(small_data_dir, f"{s3_bucket}/data/ml-small")
    config = PipelineConfig(
        data_dir=f"{s3_bucket}/data/ml-small",
        serving_model_dir=f"{s3_bucket}/models",
        output_dir=str(tmp_path / "out"),
        training=TrainingConfig(epochs=1, batch_size=256),
        gates=GateConfig(max_rmse=1.0, min_hit_rate=0.0, require_beat_baselines=False),
    )
    first = run_local(config)
    assert first.blessed and first.model_path == f"{s3_bucket}/models/mtrec/1"
    assert storage.isfile(f"{s3_bucket}/models/mtrec/1/{SAVED_MODEL_FILE}")
    # The second run finds the first model in the bucket and gates against it.
    second = run_local(config)
    assert second.metrics["previous"]["version"] == 1
    assert list_versions(f"{s3_bucket}/models/mtrec") == [1, 2]
    assert not [n for n in storage.listdir(f"{s3_bucket}/models/mtrec") if n.startswith(".")]
