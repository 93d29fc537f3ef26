"""The model server over real gRPC/HTTP on loopback, against a model the pipeline code trains and
exports on a small generated data set (built once for this module)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from components import features as F
from components.errors import MtrecError
from serving.batching import Batcher
from serving.cli import add_query_arguments, query_main
from serving.client import RecommenderClient
from serving.errors import RequestError, invalid_argument
from serving.server import ModelServer, ServerConfig
from serving.tensors import encode_tensor
from tests.conftest import write_movielens

MODEL = "mtrec"
USERS, MOVIES = 60, 40
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_export(root: str) -> dict[str, str]:
    """Ingest, preprocess (Beam), train 2 epochs: training's SavedModel is version 1."""
    from components.config import DEFAULT_TRAINING, PreprocessingConfig
    from components.ingestion.ingest import run_ingestion
    from components.preprocessing.pipeline import run_preprocessing
    from components.training.trainer import run_training

    paths = {
        name: os.path.join(root, name)
        for name in ("raw", "ratings", "movies", "examples", "serving")
    }
    write_movielens(paths["raw"], users=USERS, movies=MOVIES, per_user=25)
    run_ingestion(paths["raw"], paths["ratings"], paths["movies"])
    run_preprocessing(paths["ratings"], paths["examples"], PreprocessingConfig())
    paths["version_1"] = os.path.join(paths["serving"], MODEL, "1")
    run_training(
        paths["examples"], paths["version_1"], DEFAULT_TRAINING.replace(epochs=2, batch_size=256)
    )
    return paths


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict[str, str]:
    return build_export(str(tmp_path_factory.mktemp("serving-export")))


@pytest.fixture(scope="module")
def saved_model(export):
    return tf.saved_model.load(export["version_1"])


def start_server(base: str, **overrides) -> ModelServer:
    settings = {
        "host": "127.0.0.1",
        "port": 0,
        "rest_port": -1,
        "poll_seconds": 0.2,
        "grace_seconds": 1,
    }
    settings.update(overrides)
    return ModelServer(ServerConfig(base, MODEL, **settings)).start()


@pytest.fixture(scope="module")
def server(export):
    server = start_server(export["serving"])
    yield server
    server.stop(grace=0)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="module")
def client(server):
    with RecommenderClient(f"127.0.0.1:{server.port}", MODEL) as client:
        yield client


def predict_request(signature: str, inputs: dict, model: str = MODEL, version: int | None = None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if signature:
        request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def ids(*values: int) -> np.ndarray:
    return np.asarray(values, np.int64)  # raw MovieLens ids: int64 in the export


SIGNATURE_INPUTS = {
    "serving_default": {F.USER_ID: ids(1, 5, 60)},
    "retrieve_excluding": {
        F.USER_ID: ids(1, 5),
        F.EXCLUDED_MOVIE_IDS: np.asarray([[3, 4, -1], [7, -1, -1]], np.int64),
    },
    "rank": {F.USER_ID: ids(1, 5, 60, 2), F.MOVIE_ID: ids(1, 40, 7, 7)},
    # 35 of 40 movies excluded: fewer than k remain, so -1 / -inf padding travels too.
    "padding": {F.USER_ID: ids(2), F.EXCLUDED_MOVIE_IDS: np.arange(1, 36, dtype=np.int64)[None, :]},
}


@pytest.mark.parametrize("case", sorted(SIGNATURE_INPUTS))
def test_predict_equals_the_saved_model(stub, saved_model, case):
    signature = "retrieve_excluding" if case == "padding" else case
    inputs = SIGNATURE_INPUTS[case]
    response = stub.Predict(predict_request(signature, inputs), timeout=10)
    expected = saved_model.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    assert set(response.outputs) == set(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(tf.make_ndarray(response.outputs[name]), tensor.numpy())
    assert response.model_spec.name == MODEL
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == signature
    if case == "padding":
        assert (tf.make_ndarray(response.outputs[F.OUT_MOVIE_IDS]) == -1).any()


def test_default_signature_and_output_filter(stub, saved_model):
    response = stub.Predict(predict_request("", {F.USER_ID: ids(3)}), timeout=10)
    assert response.model_spec.signature_name == "serving_default"
    request = predict_request("", {F.USER_ID: ids(3)})
    request.output_filter.append(F.OUT_MOVIE_IDS)
    filtered = stub.Predict(request, timeout=10)
    assert list(filtered.outputs) == [F.OUT_MOVIE_IDS]
    expected = saved_model.signatures["serving_default"](user_id=tf.constant(ids(3)))
    np.testing.assert_array_equal(
        tf.make_ndarray(filtered.outputs[F.OUT_MOVIE_IDS]), expected[F.OUT_MOVIE_IDS]
    )


def test_client_recommend_retrieve_rank(client, saved_model):
    recommendations = client.recommend(5)
    assert len(recommendations) == 10
    expected = saved_model.signatures["serving_default"](user_id=tf.constant(ids(5)))
    assert [r.movie_id for r in recommendations] == expected[F.OUT_MOVIE_IDS].numpy()[0].tolist()
    stars = saved_model.signatures["rank"](
        user_id=tf.constant(ids(*[5] * 10)),
        movie_id=tf.constant(ids(*[r.movie_id for r in recommendations])),
    )[F.OUT_STARS].numpy()
    np.testing.assert_allclose([r.stars for r in recommendations], stars, rtol=1e-6)
    assert all(1.0 <= r.stars <= 5.0 for r in recommendations)
    seen = client.recommend(5, k=4, include_seen=True)
    assert len(seen) == 4
    rated = client.retrieve([5], np.zeros([1, 0], np.int64)).movie_ids[0]
    assert [r.movie_id for r in seen] == rated[:4].tolist()
    assert client.rank([1, 2], [3, 4]).stars.shape == (2,)


def test_metadata_lists_the_signatures(client):
    metadata = client.metadata()
    assert set(metadata) == {"serving_default", "retrieve_excluding", "rank", "retrieve_k"}
    assert metadata["retrieve_k"].inputs == {"user_id": ("int64", [-1]), "k": ("int32", [])}
    assert metadata["rank"].inputs == {"user_id": ("int64", [-1]), "movie_id": ("int64", [-1])}
    assert metadata["serving_default"].outputs["movie_ids"] == ("int64", [-1, 10])


def test_status_and_health(client, channel):
    assert client.status() == [(1, "AVAILABLE", "")]
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tensorflow.serving.PredictionService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


BAD_REQUESTS = {
    "unknown model": (predict_request("", {F.USER_ID: ids(1)}, model="nope"), "NOT_FOUND", "nope"),
    "unknown version": (
        predict_request("", {F.USER_ID: ids(1)}, version=7),
        "NOT_FOUND",
        "version 7",
    ),
    "unknown signature": (
        predict_request("predict", {F.USER_ID: ids(1)}),
        "INVALID_ARGUMENT",
        "'predict' not found",
    ),
    "missing input": (
        predict_request("rank", {F.USER_ID: ids(1)}),
        "INVALID_ARGUMENT",
        "needs input movie_id",
    ),
    "unknown input": (
        predict_request("", {"user": ids(1)}),
        "INVALID_ARGUMENT",
        "no input named 'user'",
    ),
    "wrong dtype": (
        predict_request("", {F.USER_ID: np.asarray([1], np.int32)}),
        "INVALID_ARGUMENT",
        "input 'user_id' of signature 'serving_default' must be int64, got int32",
    ),
    "float ids": (
        predict_request("", {F.USER_ID: np.asarray([1.0], np.float32)}),
        "INVALID_ARGUMENT",
        "int64, got float32",
    ),
    # A scalar id aborts the whole process inside TF's RaggedGather: it must be refused before.
    "scalar user id": (
        predict_request("", {F.USER_ID: np.int64(1)}),
        "INVALID_ARGUMENT",
        "must have shape [?], got []",
    ),
    "unknown movie id": (
        predict_request("rank", {F.USER_ID: ids(1), F.MOVIE_ID: ids(999)}),
        "INVALID_ARGUMENT",
        "unknown movie_id",
    ),
    "batch mismatch": (
        predict_request(
            "retrieve_excluding",
            {F.USER_ID: ids(1), F.EXCLUDED_MOVIE_IDS: np.zeros([2, 0], np.int64)},
        ),
        "INVALID_ARGUMENT",
        "same batch size",
    ),
    "version label": (
        predict_request("", {F.USER_ID: ids(1)}),
        "INVALID_ARGUMENT",
        "labels",
    ),
}
BAD_REQUESTS["version label"][0].model_spec.version_label = "stable"


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_status_naming_the_problem(stub, case):
    request, code, text = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, timeout=10)
    assert caught.value.code().name == code
    assert text in caught.value.details()
    # ... and the server still answers.
    assert stub.Predict(predict_request("", {F.USER_ID: ids(1)}), timeout=10).outputs


def test_unimplemented_methods(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(classification_pb2.ClassificationRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    "array",
    [
        np.asarray([[3, -1], [7, 9]], np.int64),
        np.asarray([[0.5, -np.inf]], np.float32),
        np.zeros([0, 10], np.float32),
        np.asarray([1, 2], np.int64),
        np.asarray([b"a", b"bc"]),
    ],
)
def test_encode_tensor_equals_make_tensor_proto(array):
    proto = predict_pb2.PredictResponse().outputs["x"]
    encode_tensor(array, proto)
    assert proto == tf.make_tensor_proto(array)
    np.testing.assert_array_equal(tf.make_ndarray(proto), array)


def test_batcher_merges_waiting_requests_and_isolates_errors():
    """While one call runs, later requests queue; the next call takes them all at once. A merged
    call that fails is re-run request by request, so only the bad request gets the error."""
    calls: list[int] = []
    release = threading.Event()

    def double(arrays):
        calls.append(len(arrays["x"]))
        if len(calls) == 1:
            release.wait(10)  # hold the first call so the others queue behind it
        if (arrays["x"] < 0).any():
            raise invalid_argument("negative id")
        return {"y": arrays["x"] * 2}

    batcher = Batcher(double)
    inputs = [
        np.asarray([1]),
        np.asarray([2, 3]),
        np.asarray([4]),
        np.asarray([-5]),
        np.asarray([6, 7]),
    ]
    with ThreadPoolExecutor(len(inputs)) as pool:
        futures = [pool.submit(batcher.run, {"x": inputs[0]})]
        wait_for(lambda: calls == [1], 10, "the first call")
        futures += [pool.submit(batcher.run, {"x": x}) for x in inputs[1:]]
        wait_for(lambda: len(batcher._pending) == len(inputs) - 1, 10, "requests to queue")
        release.set()
    for x, future in zip(inputs, futures, strict=True):
        if (x < 0).any():
            with pytest.raises(RequestError, match="negative id"):
                future.result()
        else:
            np.testing.assert_array_equal(future.result()["y"], x * 2)
    # first alone; then one merged call of 6 rows (fails on -5); then each of the four alone
    assert calls == [1, 6, 2, 1, 1, 2]
    # Requests whose non-batch shapes differ are never merged.
    calls.clear()
    assert batcher.run({"x": np.zeros([1, 3], int)})["y"].shape == (1, 3)


def test_concurrent_requests_through_the_server(stub, saved_model):
    users = [int(u) for u in np.arange(1, USERS + 1)] + [USERS + 5]  # the last: cold start
    expected = saved_model.signatures["serving_default"](user_id=tf.constant(ids(*users)))

    def ask(user):
        try:
            reply = stub.Predict(predict_request("", {F.USER_ID: ids(user)}), timeout=10)
            return tf.make_ndarray(reply.outputs[F.OUT_MOVIE_IDS])[0]
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, users))
    np.testing.assert_array_equal(np.stack(answers), expected[F.OUT_MOVIE_IDS].numpy())


def rest(server: ModelServer, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_rest_api(server, saved_model):
    expected = saved_model.signatures["serving_default"](user_id=tf.constant(ids(1, 2)))
    status, reply = rest(server, f"/v1/models/{MODEL}:predict", {"instances": [1, 2]})
    assert status == 200
    assert [row["movie_ids"] for row in reply["predictions"]] == expected[
        F.OUT_MOVIE_IDS
    ].numpy().tolist()
    rank = saved_model.signatures["rank"](
        user_id=tf.constant(ids(1, 2)), movie_id=tf.constant(ids(3, 4))
    )
    status, reply = rest(
        server,
        f"/v1/models/{MODEL}/versions/1:predict",
        {"signature_name": "rank", "inputs": {"user_id": [1, 2], "movie_id": [3, 4]}},
    )
    assert status == 200
    np.testing.assert_allclose(reply["outputs"]["stars"], rank[F.OUT_STARS].numpy(), rtol=1e-6)
    status, reply = rest(
        server,
        f"/v1/models/{MODEL}:predict",
        {
            "signature_name": "retrieve_excluding",
            "instances": [{"user_id": 5, "excluded_movie_ids": []}],
        },
    )
    assert status == 200 and len(reply["predictions"][0]["movie_ids"]) == 10
    assert rest(server, f"/v1/models/{MODEL}") == (
        200,
        {
            "model_version_status": [
                {
                    "version": "1",
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        },
    )
    status, reply = rest(server, f"/v1/models/{MODEL}/metadata")
    assert status == 200 and set(reply["metadata"]["signature_def"]["signature_def"]) == {
        "serving_default",
        "retrieve_excluding",
        "rank",
        "retrieve_k",
    }
    assert rest(server, "/v1/models/other:predict", {"instances": [1]})[0] == 404
    status, reply = rest(server, f"/v1/models/{MODEL}:predict", {"instances": [1.5]})
    assert status == 400 and "int64" in reply["error"]
    status, reply = rest(
        server,
        f"/v1/models/{MODEL}:predict",
        {"signature_name": "rank", "instances": [{"user_id": 1, "movie_id": 999}]},
    )
    assert status == 400 and "unknown movie_id" in reply["error"]


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_new_version_is_picked_up_and_a_broken_one_is_not(export, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(export["serving"], base)
    model_dir = base / MODEL
    server = start_server(str(base), keep_versions=2, rest_port=0)
    target = f"127.0.0.1:{server.port}"
    try:
        with (
            RecommenderClient(target, MODEL) as client,
            RecommenderClient(target, MODEL, version=1) as pinned_1,
            RecommenderClient(target, MODEL, version=3) as pinned_3,
        ):
            before = client.retrieve([4])
            assert before.version == 1
            # A new version appears atomically: copied under a temporary name, then renamed.
            shutil.copytree(model_dir / "1", model_dir / ".incoming-2")
            os.rename(model_dir / ".incoming-2", model_dir / "2")
            wait_for(lambda: client.retrieve([4]).version == 2, what="version 2 to be served")
            np.testing.assert_array_equal(client.retrieve([4]).movie_ids, before.movie_ids)
            assert [s.version for s in client.status()] == [1, 2]
            assert pinned_1.retrieve([4]).version == 1  # the previous one stays for pinned requests

            # A broken version: logged, reported as END with its error; version 2 keeps serving.
            (model_dir / "3").mkdir()
            (model_dir / "3" / "saved_model.pb").write_bytes(b"this is not a protobuf")
            state = wait_for(
                lambda: next((s for s in client.status() if s.version == 3), None),
                what="version 3 status",
            )
            assert state.state == "END" and state.error
            assert client.retrieve([4]).version == 2
            with pytest.raises(MtrecError, match="version 3 of model 'mtrec' is not loaded"):
                pinned_3.retrieve([4])
    finally:
        server.stop(grace=0)


def test_server_waits_for_a_first_version(export, tmp_path):
    """Started before the pipeline exported anything: NOT_SERVING and UNAVAILABLE, then serving
    as soon as a version lands; a missing base path is refused at start."""
    with pytest.raises(MtrecError, match="not a folder"):
        ModelServer(ServerConfig(str(tmp_path / "missing"), MODEL))
    server = start_server(str(tmp_path), rest_port=0)
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
            RecommenderClient(f"127.0.0.1:{server.port}", MODEL) as client,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            assert (
                health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            with pytest.raises(MtrecError, match="no version of model 'mtrec' is loaded yet"):
                client.retrieve([1])
            shutil.copytree(export["version_1"], tmp_path / MODEL / "1")
            wait_for(
                lambda: (
                    health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
                ),
                what="SERVING",
            )
            assert client.retrieve([1]).version == 1
    finally:
        server.stop(grace=0)


def parse_query(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_query_arguments(parser)
    return parser.parse_args(list(argv))


def query_user_5(server, movies: str, *extra: str) -> int:
    target = f"127.0.0.1:{server.port}"
    return query_main(parse_query("--target", target, "--user-id", "5", "--movies", movies, *extra))


def test_query_prints_ten_titles_with_ratings(server, export, capsys):
    assert query_user_5(server, export["movies"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("Top 10 movies for user 5")
    rows = lines[1:]
    assert len(rows) == 10
    for row in rows:
        assert re.match(r"^\s*\d+\. Movie \d+ \(199\d\)\s+[1-5]\.\d\d stars", row), row
    movies_file = os.path.join(export["movies"], F.MOVIES_FILE)
    query_user_5(server, movies_file, "--include-seen")
    assert "rated movies included" in capsys.readouterr().out


def test_recommend_by_rating_reorders_the_same_movies(client):
    retrieved = client.recommend(5, k=10)
    ranked = client.recommend(5, k=10, by_rating=True)
    assert sorted(r.movie_id for r in ranked) == sorted(r.movie_id for r in retrieved)
    stars = [r.stars for r in ranked]
    assert stars == sorted(stars, reverse=True)


def test_query_errors_are_one_line(server, export):
    with pytest.raises(MtrecError) as unreachable:
        query_main(parse_query("--target", "127.0.0.1:1", "--user-id", "5", "--timeout", "3"))
    assert "cannot reach the model server at 127.0.0.1:1" in str(unreachable.value)
    with pytest.raises(MtrecError) as refused:
        query_main(parse_query("--target", f"127.0.0.1:{server.port}", "--user-id", "abc"))
    assert "user_id must be integers" in str(refused.value)  # the model declares int64 ids
    for error in (unreachable.value, refused.value):
        assert "\n" not in str(error)
    with pytest.raises(MtrecError, match="not found"):
        query_main(
            parse_query(
                "--target", f"127.0.0.1:{server.port}", "--user-id", "5", "--movies", "/nonexistent"
            )
        )


@pytest.mark.slow
def test_mtrec_serve_and_query_cli_with_sigterm(export):
    """The real entry points: `mtrec serve` in a process, `mtrec query` against it, SIGTERM stops
    it cleanly, and a query error exits 2 with one line on stderr."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "serve",
            "--model-base-path",
            export["serving"],
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--poll-seconds",
            "0",
        ],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        for line in serve.stderr:
            found = re.search(r"gRPC on 127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found[1])
                break
        assert port, "the server did not report its port"

        def cli_query(*args: str) -> subprocess.CompletedProcess:
            command = [
                sys.executable,
                "-m",
                "pipeline.cli",
                "query",
                "--target",
                f"127.0.0.1:{port}",
            ]
            return subprocess.run(
                [*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
            )

        query = cli_query("--user-id", "7", "--movies", export["movies"])
        assert query.returncode == 0, query.stderr
        assert len(re.findall(r"Movie \d+ .* stars", query.stdout)) == 10
        bad = cli_query("--user-id", "abc")
        assert bad.returncode == 2
        assert bad.stderr.strip().splitlines()[-1].startswith("mtrec: error:")
        assert "Traceback" not in bad.stderr
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=20) == 0
        assert "stopped" in serve.stderr.read()
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
