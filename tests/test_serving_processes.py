"""`mtrec serve --grpc-processes 2`: two processes on one port that act as one server (reloads
applied in both, metrics summed, one readiness), and that end together. Real processes, gRPC
and HTTP on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tests.conftest import free_port
from tests.test_serving import MODEL, build_export, wait_for

pytestmark = pytest.mark.slow
CONNECTIONS = 16  # all on one of two processes: probability 2 ** -15


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> dict[str, str]:
    return build_export(str(tmp_path_factory.mktemp("processes-export")))


def start(export, *extra: str, ready: bool = True) -> tuple[subprocess.Popen, int, int]:
    port, rest_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--model-base-path", export["serving"],
         "--port", str(port), "--rest-port", str(rest_port), "--poll-seconds", "0",
         "--grace-seconds", "1", "--grpc-processes", "2", *extra],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def is_ready() -> bool:
        assert process.poll() is None, process.stderr.read()
        return status(f"http://127.0.0.1:{rest_port}/readyz") == 200

    if ready:
        wait_for(is_ready, timeout=180, what="the server to be ready")
    return process, port, rest_port


def companions(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def predict(channel, label: str = "") -> predict_pb2.PredictResponse:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.version_label = label
    request.inputs["user_id"].CopyFrom(tf.make_tensor_proto(np.array([5], np.int64)))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    return stub.Predict(request, timeout=10)


def metric(rest_port: int, name: str) -> float:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/monitoring/prometheus/metrics")
        .read()
        .decode()
    )
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_processes_act_as_one_server(export):
    process, port, rest_port = start(export)
    try:
        (companion,) = companions(process.pid)
        channels = [
            grpc.insecure_channel(f"127.0.0.1:{port}", [("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CONNECTIONS)
        ]
        for channel in channels:
            assert predict(channel).model_spec.version.value == 1
        # Metrics: every process's requests and loads, summed.
        assert metric(rest_port, "mtrec_serving_requests_total{") == CONNECTIONS
        assert metric(rest_port, 'mtrec_serving_model_loads_total{model="mtrec",outcome="ok"}') == 2
        # A reload, whichever process its connection reaches (a companion relays it to the first
        # process), is applied in both before it is answered.
        for i, channel in enumerate(channels):
            request = model_management_pb2.ReloadConfigRequest()
            text_format.Parse(
                f'model_config_list {{ config {{ name: "{MODEL}" base_path: '
                f'"{os.path.join(export["serving"], MODEL)}" version_labels {{ key: "l{i}" '
                "value: 1 } } }",
                request.config,
            )
            model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
                request, timeout=60
            )
            for other in channels:
                assert predict(other, label=f"l{i}").model_spec.version.value == 1
        with pytest.raises(grpc.RpcError, match="not configured"):
            predict(channels[0], label="l0")
        # Another group cannot take the port over through SO_REUSEPORT.
        other = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "serve", "--model-base-path",
             export["serving"], "--port", str(port), "--grpc-processes", "2"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert other.returncode == 2
        assert other.stderr.strip().endswith("(Address already in use)"), other.stderr
        assert "mtrec serve: error: cannot listen on 127.0.0.1:" in other.stderr
        for channel in channels:
            channel.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        wait_for(lambda: not alive(companion), timeout=30, what="the companion to stop")
    finally:
        process.kill()
        process.wait()


def test_companion_stops_when_the_first_process_is_killed(export):
    process, port, _ = start(export)
    (companion,) = companions(process.pid)
    process.kill()
    process.wait()
    wait_for(lambda: not alive(companion), timeout=30, what="the companion to stop")
    with socket.socket() as sock:  # nothing keeps the port
        sock.bind(("127.0.0.1", port))


def test_grpc_processes_flag_is_checked(export):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "serve", "--model-base-path", export["serving"],
         "--grpc-processes", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == "mtrec serve: error: --grpc-processes must be >= 1, got 0"


def test_ready_only_once_every_process_has_a_version(export, tmp_path):
    base = tmp_path / "base"
    (base / MODEL).mkdir(parents=True)
    process, port, rest_port = start({"serving": str(base)}, "--poll-seconds", "0.2", ready=False)
    try:
        readyz = f"http://127.0.0.1:{rest_port}/readyz"
        wait_for(lambda: status(readyz) == 503, timeout=180, what="the server to answer 503")
        shutil.copytree(export["version_1"], base / MODEL / "1")
        wait_for(lambda: status(readyz) == 200, timeout=60, what="readiness")
        channels = [
            grpc.insecure_channel(f"127.0.0.1:{port}", [("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CONNECTIONS)
        ]
        for channel in channels:  # whichever process a connection reaches has the version
            assert predict(channel).model_spec.version.value == 1
            channel.close()
    finally:
        process.kill()
        process.wait()


def status(url: str) -> int | None:
    try:
        return urllib.request.urlopen(url).status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError):
        return None
