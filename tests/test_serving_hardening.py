"""The model server against hostile requests, on its limits, flags, probes, metrics, `k` per
request, TF Serving's warmup file and model config: real gRPC and HTTP on loopback, real
SavedModel loads (the export is built with the pipeline's code, as in test_serving)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from components import features as F
from serving.cli import add_serve_arguments, serve_main
from serving.tensors import InputSpec, decode_tensor
from tests.conftest import rss_bytes
from tests.test_serving import MODEL, build_export, ids, predict_request, start_server, wait_for

MB = 1024 * 1024


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict[str, str]:
    return build_export(str(tmp_path_factory.mktemp("hardening-export")))


@pytest.fixture(scope="module")
def saved_model(export):
    return tf.saved_model.load(export["version_1"])


@pytest.fixture(scope="module")
def server(export):
    server = start_server(export["serving"], rest_read_timeout_seconds=1.0, rest_max_connections=6)
    yield server
    server.stop(grace=0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def raw_proto(dims: list[int], dtype=types_pb2.DT_INT64, **values) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **values)
    for size in dims:
        proto.tensor_shape.dim.add().size = size
    return proto


def raw_request(signature: str, inputs: dict[str, tensor_pb2.TensorProto]):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = signature
    for name, proto in inputs.items():
        request.inputs[name].CopyFrom(proto)
    return request


# --- declared sizes are refused before memory is spent ---

HUGE = {
    "batch of 5e8 with one value": (
        raw_request("", {F.USER_ID: raw_proto([500_000_000], int64_val=[1])}),
        "batch of 500000000 exceeds this server's limit of 4096 (--max-batch-size)",
    ),
    "batch of 2^40": (
        raw_request("", {F.USER_ID: raw_proto([2**40], int64_val=[1])}),
        "--max-batch-size",
    ),
    "second dimension of 1e8": (
        raw_request(
            "retrieve_excluding",
            {
                F.USER_ID: raw_proto([1], int64_val=[1]),
                F.EXCLUDED_MOVIE_IDS: raw_proto([1, 100_000_000], int64_val=[0]),
            },
        ),
        "dimension 1 of size 100000000 exceeds this server's limit of 4096 (--max-dim-size)",
    ),
    "negative dimension": (
        raw_request("", {F.USER_ID: raw_proto([-3], int64_val=[1])}),
        "negative",
    ),
    "unknown rank": (
        raw_request(
            "",
            {
                F.USER_ID: tensor_pb2.TensorProto(
                    dtype=types_pb2.DT_INT64, tensor_shape={"unknown_rank": True}, int64_val=[1]
                )
            },
        ),
        "unknown rank",
    ),
    "content shorter than the shape": (
        raw_request("", {F.USER_ID: raw_proto([4], tensor_content=b"\x01\x00\x00\x00")}),
        "tensor_content holds 4 bytes, shape [4] needs 32",
    ),
    "more values than the shape": (
        raw_request("", {F.USER_ID: raw_proto([1], int64_val=[1, 2, 3])}),
        "3 values for shape [1]",
    ),
    "rank 2 for rank 1": (
        raw_request("", {F.USER_ID: raw_proto([1, 1], int64_val=[1])}),
        "must have shape [?], got [1, 1]",
    ),
}


@pytest.mark.parametrize("case", sorted(HUGE))
def test_declared_sizes_are_refused_before_decoding(stub, case):
    request, text = HUGE[case]
    before = rss_bytes()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert text in caught.value.details()
    assert rss_bytes() - before < 100 * MB  # nothing proportional to the declared shape
    assert stub.Predict(predict_request("", {F.USER_ID: ids(1)}), timeout=10).outputs


@pytest.mark.parametrize(
    "proto",
    [
        tf.make_tensor_proto(np.asarray([[1, 2], [3, 4]], np.int32)),
        raw_proto([2, 2], types_pb2.DT_INT32, int_val=[1, 2, 3, 4]),
        raw_proto([3], types_pb2.DT_INT32, int_val=[7]),  # TF repeats the last value
        raw_proto([2], types_pb2.DT_INT32, int_val=[]),  # ... and zero-fills when none is given
        raw_proto([0, 5], types_pb2.DT_INT32),
    ],
)
def test_decode_tensor_equals_make_ndarray(proto):
    spec = InputSpec(
        "s",
        "x",
        types_pb2.DT_INT32,
        np.dtype(np.int32),
        (None,) * len(proto.tensor_shape.dim),
        True,
    )
    decoded = decode_tensor(proto, spec, 4096, 4096)
    expected = tf.make_ndarray(proto)
    assert decoded.dtype == np.int32 and decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded, expected)


# --- k per request ---


def test_retrieve_k_over_grpc_and_rest(stub, server, saved_model):
    default = saved_model.signatures["serving_default"](user_id=tf.constant(ids(1, 5)))
    reply = stub.Predict(predict_request("retrieve_k", {F.USER_ID: ids(1, 5), F.K: np.int32(3)}))
    movie_ids = tf.make_ndarray(reply.outputs[F.OUT_MOVIE_IDS])
    np.testing.assert_array_equal(movie_ids, default[F.OUT_MOVIE_IDS].numpy()[:, :3])
    # More than there are candidates (40 movies, 25 rated): k columns, padded with -1 / -inf.
    wide = stub.Predict(predict_request("retrieve_k", {F.USER_ID: ids(2), F.K: np.int32(60)}))
    wide_ids = tf.make_ndarray(wide.outputs[F.OUT_MOVIE_IDS])
    assert wide_ids.shape == (1, 60) and (wide_ids[0, -20:] == -1).all()
    assert np.isneginf(tf.make_ndarray(wide.outputs[F.OUT_SCORES])[0, -1])
    for bad in (0, F.MAX_REQUEST_K + 1):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(predict_request("retrieve_k", {F.USER_ID: ids(1), F.K: np.int32(bad)}))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"k must be in 1..{F.MAX_REQUEST_K}" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(
            predict_request("retrieve_k", {F.USER_ID: ids(1), F.K: np.asarray([3], np.int32)})
        )
    assert "must have shape [], got [1]" in caught.value.details()
    status, body, _ = call_rest(
        server,
        "POST",
        f"/v1/models/{MODEL}:predict",
        {"signature_name": "retrieve_k", "inputs": {"user_id": [1, 5], "k": 3}},
    )
    assert status == 200
    assert body["outputs"]["movie_ids"] == movie_ids.tolist()
    status, body, _ = call_rest(
        server,
        "POST",
        f"/v1/models/{MODEL}:predict",
        {
            "signature_name": "retrieve_k",
            "instances": [{"user_id": 1, "k": 2}, {"user_id": 5, "k": 2}],
        },
    )
    assert status == 200
    assert [row["movie_ids"] for row in body["predictions"]] == movie_ids[:, :2].tolist()


def test_client_recommends_more_than_ten(server):
    from serving.client import RecommenderClient

    with RecommenderClient(f"127.0.0.1:{server.port}", MODEL) as client:
        ten = client.recommend(5)
        more = client.recommend(5, k=30)  # 40 movies, 25 rated: what remains, no padding
        assert [r.movie_id for r in more[:10]] == [r.movie_id for r in ten]
        assert 10 < len(more) <= 30 and all(r.movie_id > 0 for r in more)
        assert client.retrieve([1, 2], k=3).movie_ids.shape == (2, 3)


# --- REST: JSON errors everywhere, no banner, timeouts, limits ---


def call_rest(server, method: str, path: str, body=None, headers=None, port=None):
    connection = http.client.HTTPConnection("127.0.0.1", port or server.rest_port, timeout=10)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        reply = connection.getresponse()
        raw = reply.read()
        payload = json.loads(raw) if "json" in (reply.getheader("content-type") or "") else raw
        return reply.status, payload, dict(reply.getheaders())
    finally:
        connection.close()


def test_rest_errors_are_json(server):
    path = f"/v1/models/{MODEL}"
    cases = [
        ("PUT", path, None, 405),
        ("DELETE", path + ":predict", None, 405),
        ("GET", path + ":predict", None, 405),
        ("GET", "/nowhere", None, 404),
        ("GET", "/v1/models/other", None, 404),
        ("POST", path + ":predict", b"{not json", 400),
        ("POST", path + ":predict", b"[" * 100_000 + b"]" * 100_000, 400),
        ("POST", path + ":predict", {"signature_name": {"a": 1}, "instances": [1]}, 400),
        ("POST", path + ":predict", {"instances": [[1] * 5000]}, 400),
        ("POST", path + ":predict", {"instances": [2**64]}, 400),
        (
            "POST",
            path + ":predict",
            {"signature_name": "rank", "instances": [{"user_id": 1, "movie_id": 999}]},
            400,
        ),
        ("POST", path + ":classify", {"examples": []}, 501),
    ]
    for method, where, body, expected in cases:
        status, payload, headers = call_rest(server, method, where, body)
        assert status == expected, (method, where, payload)
        assert isinstance(payload, dict) and payload["error"], (method, where)
        assert "server" not in {name.lower() for name in headers}
        if status == 405:
            assert headers["allow"] in ("GET", "POST")


def test_rest_chunked_body_keeps_the_connection_in_sync(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    try:
        body = json.dumps({"instances": [3, 4]}).encode()
        chunks = iter([body[:5], body[5:]])
        connection.request(
            "POST",
            f"/v1/models/{MODEL}:predict",
            body=chunks,
            encode_chunked=True,
            headers={"Content-Type": "application/json"},
        )
        first = connection.getresponse()
        assert first.status == 200 and len(json.loads(first.read())["predictions"]) == 2
        connection.request("GET", f"/v1/models/{MODEL}")  # same connection
        second = connection.getresponse()
        assert second.status == 200 and json.loads(second.read())["model_version_status"]
    finally:
        connection.close()


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_stalled_upload_is_cut_off_and_does_not_pin_the_server(server):
    """A body that never finishes: 408 after --rest-read-timeout-seconds (1 s here), connection
    closed; so are headers that never finish."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\n"
            'Content-Length: 1000\r\n\r\n{"instances"'.encode()
        )
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 408")
    assert b'"error"' in reply
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models/mtrec HTTP/1.1\r\nHost: x\r\n")  # headers never end
        assert read_reply(sock).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 8
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 400") and b'"error"' in reply


def test_connection_limit_and_body_limit(export):
    server = start_server(export["serving"], rest_max_connections=2, max_request_mib=1)
    try:
        held = [socket.create_connection(("127.0.0.1", server.rest_port)) for _ in range(2)]
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=10) as sock:
            reply = read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 503") and b"too many connections" in reply
        for sock in held:
            sock.close()
        wait_for(
            lambda: call_rest(server, "GET", "/healthz")[0] == 200, 10, "connections to be released"
        )
        with socket.create_connection(("127.0.0.1", server.rest_port), timeout=10) as sock:
            sock.sendall(
                f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {2 * MB}\r\n\r\n[1,".encode()
            )
            reply = read_reply(sock)
        assert reply.startswith(b"HTTP/1.1 413") and b"--max-request-mib" in reply
        # A chunked body has no length up front: cut off when it passes the limit.
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
        chunks = (b"1," * 1000 for _ in range(600))
        try:
            connection.request(
                "POST", f"/v1/models/{MODEL}:predict", body=chunks, encode_chunked=True
            )
            assert connection.getresponse().status == 413
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while the client was still sending
        finally:
            connection.close()
    finally:
        server.stop(grace=0)


# --- probes and metrics ---


def test_probes_follow_the_loaded_versions(export, tmp_path):
    server = start_server(str(tmp_path))
    try:
        assert call_rest(server, "GET", "/healthz")[0] == 200
        status, payload, _ = call_rest(server, "GET", "/readyz")
        assert status == 503 and MODEL in payload["error"]
        assert call_rest(server, "GET", f"/v1/models/{MODEL}")[0] == 404  # nothing to report yet
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            request = health_pb2.HealthCheckRequest(service="")
            assert check(request).status == health_pb2.HealthCheckResponse.NOT_SERVING
            shutil.copytree(export["version_1"], tmp_path / MODEL / "1")
            wait_for(lambda: call_rest(server, "GET", "/readyz")[0] == 200, what="ready")
            assert check(request).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=0)


def test_prometheus_metrics(server, stub):
    stub.Predict(predict_request("rank", {F.USER_ID: ids(1, 2), F.MOVIE_ID: ids(3, 4)}))
    with pytest.raises(grpc.RpcError):
        stub.Predict(predict_request("rank", {F.USER_ID: ids(1), F.MOVIE_ID: ids(999)}))
    call_rest(server, "POST", f"/v1/models/{MODEL}:predict", {"instances": [1]})
    status, text, headers = call_rest(server, "GET", "/monitoring/prometheus/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = text.decode()
    for line in (
        'mtrec_serving_requests_total{api="grpc",model="mtrec",signature="rank",status="OK",'
        'version="1"}',
        'mtrec_serving_requests_total{api="grpc",model="mtrec",signature="rank",'
        'status="INVALID_ARGUMENT",version="1"}',
        'mtrec_serving_requests_total{api="rest",model="mtrec",signature="serving_default",'
        'status="OK",version="1"}',
        'mtrec_serving_request_latency_seconds_bucket{api="grpc",le="0.001",model="mtrec",'
        'signature="rank",status="OK",version="1"}',
        'mtrec_serving_model_loads_total{model="mtrec",outcome="ok"} 1.0',
        "mtrec_serving_requests_in_flight 0.0",
        'mtrec_serving_batch_size_bucket{le="2.0"}',
    ):
        assert line in text, line


# --- flags ---


def serve(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mtrec serve")
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "argv, text",
    [
        (("BASE", "--max-batch-size", "-1"), "--max-batch-size must be >= 1, got -1"),
        (("BASE", "--keep-versions", "0"), "--keep-versions must be >= 1, got 0"),
        (("BASE", "--workers", "-1"), "--workers must be >= 0, got -1"),
        (("BASE", "--grpc-processes", "1000"), "--grpc-processes must be <= 64, got 1000"),
        (("BASE", "--port", "70000"), "--port must be in 0..65535"),
        (("BASE", "--poll-seconds", "nan"), "--poll-seconds must be >= 0"),
        (("BASE", "--model-config-file", "x.conf"), "exactly one of --model-base-path"),
        ((), "exactly one of --model-base-path"),
    ],
)
def test_bad_flags_are_one_line(argv, text, export, capsys):
    args = []
    for arg in argv:
        args += ["--model-base-path", export["serving"]] if arg == "BASE" else [arg]
    assert serve(*args).host == "127.0.0.1"  # loopback unless told otherwise
    assert serve_main(serve(*args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtrec serve: error: ") and text in err and "\n" not in err


def test_ports_in_use_are_one_line(server, export, capsys):
    for port in ("--port", str(server.port)), ("--port", "0", "--rest-port", str(server.rest_port)):
        assert serve_main(serve("--model-base-path", export["serving"], *port)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mtrec serve: error: cannot listen on 127.0.0.1:") and "\n" not in err


def test_start_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "models.conf"
    bad.write_text("model_config_list { config { name: 'a' base_path: '/x' nonsense: 1 } }")
    for argv in (
        ("--model-base-path", str(tmp_path / "missing")),
        ("--model-config-file", str(bad)),
        ("--model-config-file", str(tmp_path / "absent.conf")),
    ):
        assert serve_main(serve(*argv, "--port", "0")) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mtrec serve: error: ") and "\n" not in err, err


# --- TF Serving's warmup file ---


def write_warmup(version_dir, requests) -> None:
    folder = os.path.join(version_dir, "assets.extra")
    os.makedirs(folder, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(folder, "tf_serving_warmup_requests")) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def test_warmup_file_is_replayed_before_a_version_is_available(export, tmp_path):
    model_dir = tmp_path / MODEL
    shutil.copytree(export["version_1"], model_dir / "1")
    write_warmup(
        model_dir / "1",
        [
            predict_request("", {F.USER_ID: ids(1, 2)}),
            predict_request("rank", {F.USER_ID: ids(1), F.MOVIE_ID: ids(3)}),
            predict_request("retrieve_k", {F.USER_ID: ids(1), F.K: np.int32(5)}),
        ],
    )
    shutil.copytree(export["version_1"], model_dir / "2")
    write_warmup(model_dir / "2", [predict_request("nope", {F.USER_ID: ids(1)})])
    server = start_server(str(tmp_path), keep_versions=2, rest_port=0)
    try:
        manager = server.registry.manager(MODEL)
        assert manager.latest.version == 1 and manager.latest.warmup_records == 3
        (failed,) = manager.states(2)
        assert failed.state == "END" and "warmup record 0 failed" in failed.error
    finally:
        server.stop(grace=0)


# --- TF Serving's model config file, labels, reload ---


def config_text(*models: tuple[str, str, str]) -> str:
    entries = "".join(
        f'config {{ name: "{name}" base_path: "{path}" model_platform: "tensorflow" {extra} }}\n'
        for name, path, extra in models
    )
    return f"model_config_list {{\n{entries}}}\n"


def test_model_config_file_labels_and_reload(export, tmp_path):
    two = tmp_path / "two"
    for version in (1, 2):
        shutil.copytree(export["version_1"], two / str(version))
    one = tmp_path / "one"
    shutil.copytree(export["version_1"], one / "1")
    config_file = tmp_path / "models.conf"
    labelled = (
        "model_version_policy { specific { versions: 1 versions: 2 } } "
        'version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 2 }'
    )
    config_file.write_text(config_text(("mtrec", str(two), labelled), ("other", str(one), "")))
    server = start_server(
        "",
        model_config_file=str(config_file),
        model_config_file_poll_wait_seconds=0.2,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
            models = model_service_pb2_grpc.ModelServiceStub(channel)
            for label, version in (("stable", 1), ("canary", 2)):
                request = predict_request("", {F.USER_ID: ids(1)})
                request.model_spec.version_label = label
                assert predict(request).model_spec.version.value == version
            status, body, _ = call_rest(
                server, "POST", "/v1/models/mtrec/labels/canary:predict", {"instances": [1]}
            )
            assert status == 200 and len(body["predictions"]) == 1
            other = predict_request("", {F.USER_ID: ids(1)}, model="other")
            assert predict(other).model_spec.version.value == 1
            # The file changes: "other" goes, the server follows within a poll.
            config_file.write_text(config_text(("mtrec", str(two), "")))
            wait_for(lambda: "other" not in server.registry.managers, what="config re-read")
            with pytest.raises(grpc.RpcError) as caught:
                predict(other)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            # HandleReloadConfigRequest: applied (models loaded) before it answers.
            reload = model_management_pb2.ReloadConfigRequest()
            reload.config.CopyFrom(
                model_server_config_pb2.ModelServerConfig(
                    model_config_list={
                        "config": [
                            {
                                "name": "mtrec",
                                "base_path": str(two),
                                "model_platform": "tensorflow",
                            },
                            {
                                "name": "third",
                                "base_path": str(one),
                                "model_platform": "tensorflow",
                            },
                        ]
                    }
                )
            )
            assert models.HandleReloadConfigRequest(reload).status.error_code == 0
            third = predict_request("", {F.USER_ID: ids(1)}, model="third")
            assert predict(third).model_spec.version.value == 1
            bad = model_management_pb2.ReloadConfigRequest()
            with pytest.raises(grpc.RpcError) as caught:
                models.HandleReloadConfigRequest(bad)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(grace=0)
