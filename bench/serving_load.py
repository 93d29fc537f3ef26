"""What bench/serving.py measures with: the workloads (pre-built requests per signature), the
in-process model calls, the asyncio gRPC load generator, and the servers it starts (`mtrec serve`
and the empty-handler floor).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    predict_pb2,
)

from components import features as F

PREDICT = "/tensorflow.serving.PredictionService/Predict"


RANK_BATCH = 10


POOL = 256  # distinct pre-built requests per workload


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Channels with the same target and options share one connection (gRPC's global subchannel
# pool): without this, N "clients" are N streams on one connection to one server thread.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def build_export(data_dir: str, work_dir: str, model_name: str, epochs: int) -> str:
    """The pipeline's own stages on a raw ml-100k folder; returns the export base path."""
    from components.config import DEFAULT_TRAINING, PreprocessingConfig
    from components.ingestion.ingest import run_ingestion
    from components.preprocessing.pipeline import run_preprocessing
    from components.training.trainer import run_training

    ratings, movies, examples = (
        os.path.join(work_dir, n) for n in ("ratings", "movies", "examples")
    )
    base = os.path.join(work_dir, "serving")
    run_ingestion(data_dir, ratings, movies)
    run_preprocessing(ratings, examples, PreprocessingConfig())
    run_training(
        examples, os.path.join(base, model_name, "1"), DEFAULT_TRAINING.replace(epochs=epochs)
    )
    return base


def latest_version_dir(base: str, model_name: str) -> str:
    model_dir = os.path.join(base, model_name)
    versions = sorted(int(v) for v in os.listdir(model_dir) if v.isdigit())
    if not versions:
        sys.exit(f"no versions under {model_dir}")
    return os.path.join(model_dir, str(versions[-1]))


def input_dtypes(version_dir: str) -> dict[str, dict[str, int]]:
    """Signature -> input name -> declared dtype enum, from the export's SignatureDefs."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "saved_model.pb"), "rb") as handle:
        saved.ParseFromString(handle.read())
    graph = next(g for g in saved.meta_graphs if "serve" in g.meta_info_def.tags)
    return {
        name: {n: info.dtype for n, info in sig.inputs.items()}
        for name, sig in graph.signature_def.items()
    }


def _as_dtype(values: np.ndarray, enum: int) -> np.ndarray:
    """Ids 1..n as the signature declares them: int32, int64, or their decimal text."""
    if enum == tf.string.as_datatype_enum:
        return np.asarray([str(v).encode() for v in values.ravel()], object).reshape(values.shape)
    return values.astype(tf.dtypes.as_dtype(enum).as_numpy_dtype)


def workloads(
    num_users: int, num_movies: int, dtypes: dict | None = None, seed: int = 0
) -> dict[str, list[dict]]:
    """Input dicts per workload (numpy, of each signature's declared dtype; int32 when not
    given), drawn once so both sides see the same calls."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, num_users, size=POOL)
    int32 = tf.int32.as_datatype_enum
    dtypes = dtypes or {}
    retrieve = dtypes.get(F.SIGNATURE_RETRIEVE, {})
    rank = dtypes.get(F.SIGNATURE_RANK, {})
    found = {
        "retrieve": [
            {F.USER_ID: _as_dtype(np.asarray([u]), retrieve.get(F.USER_ID, int32))} for u in users
        ],
    }
    if not dtypes or rank:  # implicit-feedback exports have no rank signature
        found["rank"] = [
            {
                F.USER_ID: _as_dtype(np.full(RANK_BATCH, u), rank.get(F.USER_ID, int32)),
                F.MOVIE_ID: _as_dtype(
                    rng.integers(1, num_movies, size=RANK_BATCH), rank.get(F.MOVIE_ID, int32)
                ),
            }
            for u in users
        ]
    return found


SIGNATURES = {"retrieve": F.SIGNATURE_RETRIEVE, "rank": F.SIGNATURE_RANK}


class SessionCalls:
    """The model call as the server makes it (serving/signatures.py): a TF1 Session over the
    export, each signature's tensors run by name through a pre-pruned callable, ops in the
    calling thread. (This file is bench/serving.py, so `import serving` here would import
    itself; the few lines are repeated.)"""

    def __init__(self, version_dir: str, inter_op_threads: int, intra_op_threads: int = 1):
        from tensorflow.core.protobuf import config_pb2
        from tensorflow.python.util import deprecation

        graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(
            inter_op_parallelism_threads=inter_op_threads,
            intra_op_parallelism_threads=intra_op_threads,
        )
        self.session = tf.compat.v1.Session(graph=graph, config=config)
        with graph.as_default(), deprecation.silence():
            meta_graph = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], version_dir)
        self.calls = {}
        self.outputs = {}
        for name, sig in meta_graph.signature_def.items():
            if name == "__saved_model_init_op":  # not callable
                continue
            inputs, outputs = sorted(sig.inputs), sorted(sig.outputs)
            self.outputs[name] = outputs
            options = config_pb2.CallableOptions(
                feed=[sig.inputs[n].name for n in inputs],
                fetch=[sig.outputs[n].name for n in outputs],
            )
            options.run_options.inter_op_thread_pool = -1
            self.calls[name] = (inputs, self.session._make_callable_from_options(options))

    def function(self, signature: str):
        names, call = self.calls[signature]
        return lambda **arrays: call(*[arrays[n] for n in names])


def summarise(latencies: list[float], wall: float) -> dict:
    ms = np.asarray(latencies) * 1e3
    return {
        "requests": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "rps": len(ms) / wall,
    }


def run_in_process(
    function, inputs: list[dict], clients: int, requests: int, seconds: float, session: bool
) -> dict:
    """`function(**inputs)` from `clients` threads: the server's Session callable (numpy in
    and out), or the TF2 signature function (tensors in, `.numpy()` out)."""
    tensors = inputs if session else [{k: tf.constant(v) for k, v in i.items()} for i in inputs]
    for item in tensors[:20]:
        function(**item)
    per_client = max(1, requests // clients)
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        mine = []
        for i in range(per_client):
            if time.perf_counter() > deadline:
                break
            item = tensors[(offset + i) % len(tensors)]
            started = time.perf_counter()
            outputs = function(**item)
            if not session:
                {k: v.numpy() for k, v in outputs.items()}
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [c * 7 for c in range(clients)]))
    return summarise(latencies, time.perf_counter() - started)


def serialised_requests(model_name: str, signature: str, inputs: list[dict]) -> list[bytes]:
    payloads = []
    for item in inputs:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature
        for name, array in item.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
        payloads.append(request.SerializeToString())
    return payloads


async def _run_grpc(
    target: str, payloads: list[bytes], clients: int, requests: int, seconds: float
) -> dict:
    # One connection per client, as separate client processes would have.
    channels = [grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(clients)]
    try:
        calls = [channel.unary_unary(PREDICT) for channel in channels]  # bytes in, bytes out
        for call in calls:
            for payload in payloads[:5]:
                predict_pb2.PredictResponse.FromString(await call(payload, timeout=10))
        per_client = max(1, requests // clients)
        deadline = time.perf_counter() + seconds
        latencies: list[float] = []

        async def client(call, offset: int) -> None:
            for i in range(per_client):
                if time.perf_counter() > deadline:
                    return
                started = time.perf_counter()
                await call(payloads[(offset + i) % len(payloads)], timeout=10)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client(call, c * 7) for c, call in enumerate(calls)))
        return summarise(latencies, time.perf_counter() - started)
    finally:
        for channel in channels:
            await channel.close()


def run_grpc(
    target: str, payloads: list[bytes], clients: int, requests: int, seconds: float
) -> dict:
    return asyncio.run(_run_grpc(target, payloads, clients, requests, seconds))


SERVE = (
    "import argparse, logging, sys; from serving.cli import add_serve_arguments, serve_main; "
    "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s'); "
    "p = argparse.ArgumentParser(); add_serve_arguments(p); sys.exit(serve_main(p.parse_args()))"
)


# The floor: the same gRPC server machinery with a handler that does nothing (empty response),
# in as many processes sharing the port as the server has.
ECHO = (
    "import sys, threading; from concurrent import futures; import grpc; "
    "from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc as svc\n"
    "class Echo(svc.PredictionServiceServicer):\n"
    "    def Predict(self, request, context): return predict_pb2.PredictResponse()\n"
    "server = grpc.server(futures.ThreadPoolExecutor(int(sys.argv[1])), "
    "options=[('grpc.so_reuseport', 1)])\n"
    "svc.add_PredictionServiceServicer_to_server(Echo(), server)\n"
    "port = server.add_insecure_port('127.0.0.1:' + sys.argv[2])\n"
    "print('gRPC on 127.0.0.1:%d' % port, file=sys.stderr, flush=True)\n"
    "server.start(); server.wait_for_termination()\n"
)


def wait_for_start(process: subprocess.Popen) -> str:
    """The server's start-up log line (it names the port and the handler threads); with several
    gRPC processes, the first process's, logged once the others serve."""
    for line in process.stderr:
        if re.search(r"gRPC on 127\.0\.0\.1:(\d+)", line) and "[gRPC process" not in line:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return line
    sys.exit(f"the server did not start (exit status {process.wait()})")


def port_of(line: str) -> int:
    return int(re.search(r"gRPC on 127\.0\.0\.1:(\d+)", line)[1])


def pinned_to(cpus: set[int] | None):
    """A Popen preexec_fn that confines the child (and every thread it starts) to `cpus`."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def start_echo_server(
    workers: int, processes: int = 1, cpus: set[int] | None = None
) -> tuple[list[subprocess.Popen], int]:
    def echo(port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", ECHO, str(workers), str(port)],
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            preexec_fn=pinned_to(cpus),
        )

    first = echo(0)
    port = port_of(wait_for_start(first))
    others = [echo(port) for _ in range(processes - 1)]
    for process in others:
        wait_for_start(process)
    return [first, *others], port


def start_server(args: argparse.Namespace, base: str) -> tuple[subprocess.Popen, int, int]:
    """`mtrec serve` (through serving.cli) in its own process: returns it, its port and its
    gRPC thread count. This file is bench/serving.py, so `import serving` here would import
    itself: the server runs from the repository root and reports its settings in its log."""
    command = [
        *(sys.executable, "-c", SERVE, "--model-base-path", base, "--model-name", args.model_name),
        *("--host", "127.0.0.1", "--port", "0", "--poll-seconds", "0"),
        *("--inter-op-threads", str(args.inter_op_threads), "--workers", str(args.workers)),
        *("--grpc-processes", str(args.grpc_processes)),
        "--batching" if args.batching else "--no-batching",
        *("--intra-op-threads", str(args.intra_op_threads)),
    ]
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        preexec_fn=pinned_to(args.server_cpus),
    )
    line = wait_for_start(process)
    return process, port_of(line), int(re.search(r"(\d+) handler threads", line)[1])
