"""Stage 5, infra-validation (TFX's InfraValidator): load the candidate as TF Serving does and in
`mtrec serve`, replay its warmup requests against both, before anything is pushed.

1. TF Serving's way: a TF1 `Session` in its own graph loads the SavedModel with tag `serve`
   (running `__saved_model_init_op`), and each request runs the SignatureDef's tensors by name.
2. `mtrec serve` in a subprocess on a free loopback port, over a copy of the candidate laid out
   as `<base>/<name>/1/`; the warmup requests go over gRPC once health says SERVING.
The two answers must agree. Any failure is a GateError: the run stops and nothing is pushed.
"""

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from components import features as F
from components.artifacts.saved_model import check_model_dir, read_warmup_requests
from components.errors import GateError
from components.storage import atomic_output_dir

log = logging.getLogger(__name__)

SERVER_START_SECONDS = 120.0  # importing TensorFlow and loading the model, on a slow node
REQUEST_SECONDS = 30.0
SERVER_STOP_SECONDS = 0.5  # after SIGTERM, before SIGKILL
ATOL = 1e-5  # the same graph on the same CPU; scores are O(1)


def _arrays(request) -> dict[str, np.ndarray]:
    import tensorflow as tf

    return {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}


def run_as_tf_serving(model_dir: str, requests: list) -> list[dict[str, np.ndarray]]:
    """Each request through a TF1 Session over the SavedModel, signatures run by tensor name."""
    import tensorflow as tf

    outputs = []
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], model_dir)
        for request in requests:
            name = request.model_spec.signature_name or F.SIGNATURE_RETRIEVE
            if name not in meta_graph.signature_def:
                raise GateError(f"warmup request for signature {name!r}, which the model lacks")
            signature = meta_graph.signature_def[name]
            feed = {signature.inputs[key].name: value for key, value in _arrays(request).items()}
            fetch = {key: info.name for key, info in signature.outputs.items()}
            outputs.append(session.run(fetch, feed))
    return outputs


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def started_server(model_dir: str, model_name: str, workdir: str) -> Iterator[Callable[[], str]]:
    """`mtrec serve` over a copy of the candidate, on a free loopback port, started now (its
    start-up overlaps the caller's work); yields a function that waits until it is SERVING and
    returns its target."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    base = os.path.join(workdir, "serving")
    shutil.copytree(model_dir, os.path.join(base, model_name, "1"))
    port = _free_port()
    log_path = os.path.join(workdir, "server.log")
    command = [
        sys.executable, "-m", "pipeline.cli", "serve", "--model-base-path", base,
        "--model-name", model_name, "--host", "127.0.0.1", "--port", str(port),
        "--poll-seconds", "0",
    ]  # fmt: skip
    with open(log_path, "w", encoding="utf-8") as server_log:
        process = subprocess.Popen(command, stdout=server_log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"

    def wait_until_serving() -> str:
        deadline = time.monotonic() + SERVER_START_SECONDS
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if process.poll() is not None:
                    raise GateError(
                        f"mtrec serve exited with status {process.returncode}: " + _tail(log_path)
                    )
                with contextlib.suppress(grpc.RpcError):
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                if time.monotonic() > deadline:
                    raise GateError(
                        f"mtrec serve did not become SERVING within {SERVER_START_SECONDS:.0f}s: "
                        + _tail(log_path)
                    )
                time.sleep(0.1)
        return target

    try:
        yield wait_until_serving
    finally:
        # SIGTERM drains the server; then its interpreter unloads TensorFlow, which takes 1-2 s
        # on 2 cores and checks nothing: past a short grace the throwaway server is killed.
        process.terminate()
        try:
            process.wait(timeout=SERVER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(path: str, lines: int = 5) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return " | ".join(line.strip() for line in handle.readlines()[-lines:] if line.strip())


def run_over_grpc(target: str, requests: list) -> list[dict[str, np.ndarray]]:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    outputs = []
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for request in requests:
            try:
                response = stub.Predict(request, timeout=REQUEST_SECONDS)
            except grpc.RpcError as err:
                raise GateError(
                    f"mtrec serve refused a warmup request for {request.model_spec.signature_name!r}:"
                    f" {err.code().name}: {err.details()}"
                ) from None
            outputs.append({k: tf.make_ndarray(v) for k, v in response.outputs.items()})
    return outputs


def _compare(signature: str, expected: dict, got: dict) -> None:
    if set(expected) != set(got):
        raise GateError(
            f"{signature}: mtrec serve returned outputs {sorted(got)}, the SavedModel "
            f"{sorted(expected)}"
        )
    for key, value in expected.items():
        value, other = np.asarray(value), np.asarray(got[key])
        if value.dtype.kind in "OSUb" or other.dtype.kind in "OSUb":  # ids and flags: exact
            same = value.shape == other.shape and bool(np.all(value == other))
        else:
            same = np.allclose(value, other, atol=ATOL, equal_nan=True)
        if not same:
            raise GateError(
                f"{signature}: output {key!r} differs between TF1 Session and mtrec serve"
            )


def infra_validate(model_dir: str, model_name: str = F.DEFAULT_MODEL_NAME) -> dict[str, Any]:
    """Both checks; returns the infra blessing (raises GateError on any failure)."""
    check_model_dir(model_dir)
    started = time.perf_counter()
    # The server starts first: its start-up (TensorFlow's import, the model's load and warm-up)
    # overlaps this process importing TensorFlow and loading the TF1 Session.
    with (
        tempfile.TemporaryDirectory(prefix="mtrec-infra-") as workdir,
        started_server(model_dir, model_name, workdir) as wait_until_serving,
    ):
        requests = list(read_warmup_requests(model_dir))
        if not requests:
            raise GateError(f"{model_dir}: no warmup requests to validate with")
        for request in requests:
            request.model_spec.name = model_name
        try:
            session_outputs = run_as_tf_serving(model_dir, requests)
        except GateError:
            raise
        except Exception as err:  # whatever TF raises loading or running: the candidate fails
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise GateError(f"the SavedModel fails as TF Serving loads it: {first}") from None
        served = run_over_grpc(wait_until_serving(), requests)
    checks = []
    for request, expected, got in zip(requests, session_outputs, served, strict=True):
        _compare(request.model_spec.signature_name, expected, got)
        checks.append({"name": request.model_spec.signature_name, "passed": True})
    return {
        "blessed": True,
        "checks": checks,
        "requests": len(requests),
        "seconds": round(time.perf_counter() - started, 2),
    }


def run_infra_validation(
    model_dir: str, out_dir: str, model_name: str = F.DEFAULT_MODEL_NAME
) -> dict:
    blessing = infra_validate(model_dir, model_name)
    with (
        atomic_output_dir(out_dir) as staging,
        open(os.path.join(staging, F.INFRA_BLESSING_FILE), "w", encoding="utf-8") as out,
    ):
        json.dump(blessing, out, indent=2)
    log.info("infra-validation passed: %d warmup requests", blessing["requests"])
    return blessing
