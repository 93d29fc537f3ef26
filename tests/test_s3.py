"""The cluster's storage path, against a real S3-protocol server (moto) on loopback: a whole
`mtrec run` reading its data from s3:// and pushing the blessed model to s3://."""

import os
import time

import pytest

from components import storage
from components.artifacts.model_versions import SAVED_MODEL_FILE, list_versions
from components.config import GateConfig, PipelineConfig, TrainingConfig


def _upload_folder(local: str, remote: str) -> None:
    for name in ("u.data", "u.item"):
        storage.upload_file(os.path.join(local, name), storage.join(remote, name))


@pytest.mark.slow
def test_mtrec_run_reads_and_pushes_through_s3(tmp_path, s3_bucket, small_data_dir):
    """The small generated data set (the real ML-100k runs in tests/test_ml100k.py): what this
    checks is storage, both ways, and the gate against the model found in the bucket."""
    from pipeline.runners import run_local

    _upload_folder(small_data_dir, f"{s3_bucket}/data/ml-100k")
    config = PipelineConfig(
        data_dir=f"{s3_bucket}/data/ml-100k",
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


@pytest.mark.slow
def test_mtrec_serve_polls_an_s3_base_path(s3_bucket, small_saved_model):
    """Versions pushed to the bucket are picked up by the server: the first, then a newer one."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.client import RecommenderClient
    from serving.server import ModelServer, ServerConfig

    base = f"{s3_bucket}/models"
    _upload_tree(small_saved_model, f"{base}/mtrec/1")
    server = ModelServer(
        ServerConfig(base, "mtrec", host="127.0.0.1", port=0, rest_port=-1, poll_seconds=0.2)
    ).start()
    try:
        target = f"127.0.0.1:{server.port}"
        with grpc.insecure_channel(target) as channel, RecommenderClient(target, "mtrec") as client:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == 1  # SERVING
            assert client.retrieve([1, 2]).version == 1
            _upload_tree(small_saved_model, f"{base}/mtrec/2")
            deadline = time.monotonic() + 60
            while client.retrieve([1]).version != 2:
                assert time.monotonic() < deadline, "version 2 was never served"
                time.sleep(0.2)
    finally:
        server.stop(grace=0)


def _upload_tree(local: str, remote: str) -> None:
    """As the pusher orders it: saved_model.pb last."""
    files = storage.local_files(local)
    for relative in [f for f in files if f != SAVED_MODEL_FILE] + [SAVED_MODEL_FILE]:
        storage.upload_file(os.path.join(local, relative), storage.join(remote, relative))


def test_a_broken_candidate_is_never_pushed(tmp_path, s3_bucket, small_saved_model):
    """Infra-validation fails on a candidate TF Serving cannot load, so the push has no infra
    blessing to show and refuses: nothing reaches the bucket."""
    import json
    import shutil

    from components import features as F
    from components.errors import GateError
    from components.infra_validation.validator import run_infra_validation
    from components.push.pusher import push

    broken = str(tmp_path / "broken")
    shutil.copytree(small_saved_model, broken)
    with open(os.path.join(broken, SAVED_MODEL_FILE), "wb") as handle:
        handle.write(b"not a SavedModel")
    with pytest.raises(GateError, match="fails as TF Serving loads it"):
        run_infra_validation(broken, str(tmp_path / "infra"))
    blessing = tmp_path / "blessing"
    blessing.mkdir()
    (blessing / F.BLESSING_FILE).write_text(json.dumps({"blessed": True, "gates": []}))
    with pytest.raises(GateError, match="infra_blessing.json: not found"):
        push(broken, str(blessing), str(tmp_path / "infra"), f"{s3_bucket}/models", "mtrec")
    assert storage.listdir(f"{s3_bucket}/models") == []
