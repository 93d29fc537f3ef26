"""Benchmark the model server over loopback against the same calls made in-process (by hand).

Why: the server's cost is its overhead on top of the model. Each figure is measured twice in the
same run: through `mtrec serve` (a separate process, gRPC on 127.0.0.1) and by calling the loaded
SavedModel's signature in this process the way the server calls it (a TF1 Session callable;
`--in-process function` for the TF2 signature function instead), at 1, 8 and 32 concurrent
clients. The ratio of the two is the server's overhead. With `--grpc-processes N` the server runs N
processes on the port, and so does the floor's empty-handler server. Inputs take each signature's declared
dtype (int32, int64 or string ids); an export without `rank` is benchmarked on retrieve only. Targets on a 2-core machine (issue 11): retrieve p50 <= 0.7 ms at 1 client
and >= 3,500 requests/s at 8 clients, client included, and within 1.5x of "gRPC floor + model
call" measured in the same run (the last table's bottom rows).

- retrieve: `serving_default`, one user per request (users vary);
- rank: `rank`, one user and 10 movies per request (the batched call `mtrec query` makes).
Clients are asyncio gRPC calls on one channel with pre-serialised requests, so the client costs
little of the CPU the server shares with it. Requests are bounded per level (count and seconds).

Soak (`--soak SECONDS`): `--soak-clients` clients call retrieve without pause against a server
started from a model config file; a third of the way in, a new version appears (switch); at half
way the config file changes (re-read: latest{2} and a label); at two thirds a
HandleReloadConfigRequest arrives. Prints requests, failures by status and the server's RSS
(after warm-up, at the end, peak). Target: 0 failures, RSS flat.

Usage:
    python bench/serving.py --model-base-path EXPORT_BASE [--model-name mtrec]
    python bench/serving.py --data-dir path/to/ml-100k   # trains and exports first
    python bench/serving.py --model-base-path EXPORT_BASE --soak 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
)

from components import features as F  # noqa: E402
from components.artifacts.model_versions import metadata_path  # noqa: E402

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


# --- in-process: the signature called directly, from `clients` threads ---


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


# --- over gRPC: asyncio calls with pre-serialised requests ---


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


# --- the server process ---

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


def _wait_for_start(process: subprocess.Popen) -> str:
    """The server's start-up log line (it names the port and the handler threads); with several
    gRPC processes, the first process's, logged once the others serve."""
    for line in process.stderr:
        if re.search(r"gRPC on 127\.0\.0\.1:(\d+)", line) and "[gRPC process" not in line:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return line
    sys.exit(f"the server did not start (exit status {process.wait()})")


def _port(line: str) -> int:
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
    port = _port(_wait_for_start(first))
    others = [echo(port) for _ in range(processes - 1)]
    for process in others:
        _wait_for_start(process)
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
    line = _wait_for_start(process)
    return process, _port(line), int(re.search(r"(\d+) handler threads", line)[1])


# --- soak: continuous load through a version switch and two config reloads ---


def model_config(name: str, model_dir: str, extra: str = "") -> str:
    return (
        f'model_config_list {{ config {{ name: "{name}" base_path: "{model_dir}" '
        f'model_platform: "tensorflow" {extra} }} }}\n'
    )


def rss_mib(pid: int) -> float:
    """Resident memory of the server: the process and its companion gRPC processes."""
    total = 0.0
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            total += sum(rss_mib(int(child)) for child in children.read().split())
    except FileNotFoundError:
        pass
    return total


async def _soak(args, port: int, pid: int, payloads: list[bytes], model_dir: str, conf: str):
    target = f"127.0.0.1:{port}"
    seconds = args.soak
    channels = [
        grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(args.soak_clients)
    ]
    ok, failures, versions = 0, {}, set()
    started = time.perf_counter()
    deadline = started + seconds
    rss: list[tuple[float, float]] = []

    async def client(channel, offset: int) -> None:
        nonlocal ok
        call = channel.unary_unary(PREDICT)
        i = offset
        while time.perf_counter() < deadline:
            try:
                reply = await call(payloads[i % len(payloads)], timeout=10)
                ok += 1
                if i % 64 == 0:
                    versions.add(
                        predict_pb2.PredictResponse.FromString(reply).model_spec.version.value
                    )
            except grpc.aio.AioRpcError as error:
                failures[error.code().name] = failures.get(error.code().name, 0) + 1
            i += 1

    async def events() -> None:
        done = set()
        while time.perf_counter() < deadline:
            elapsed = time.perf_counter() - started
            rss.append((elapsed, rss_mib(pid)))
            if elapsed > seconds / 3 and "switch" not in done:
                done.add("switch")
                incoming = os.path.join(model_dir, ".incoming-2")
                await asyncio.to_thread(shutil.copytree, os.path.join(model_dir, "1"), incoming)
                os.rename(incoming, os.path.join(model_dir, "2"))
                print(f"  {elapsed:5.1f}s: version 2 written", flush=True)
            if elapsed > seconds / 2 and "file" not in done:
                done.add("file")
                extra = (
                    "model_version_policy { latest { num_versions: 2 } } "
                    'version_labels { key: "stable" value: 1 }'
                )
                with open(conf, "w", encoding="utf-8") as out:
                    out.write(model_config(args.model_name, model_dir, extra))
                print(f"  {elapsed:5.1f}s: config file rewritten", flush=True)
            if elapsed > 2 * seconds / 3 and "reload" not in done:
                done.add("reload")
                request = model_management_pb2.ReloadConfigRequest()
                text = model_config(
                    args.model_name, model_dir, 'version_labels { key: "stable" value: 2 }'
                )
                text_format.Parse(text, request.config)
                stub = model_service_pb2_grpc.ModelServiceStub(channels[0])
                reply = await stub.HandleReloadConfigRequest(request, timeout=60)
                print(f"  {elapsed:5.1f}s: HandleReloadConfigRequest -> {reply.status.error_code}")
            await asyncio.sleep(1.0)

    try:
        await asyncio.gather(events(), *(client(c, k * 7) for k, c in enumerate(channels)))
    finally:
        for channel in channels:
            await channel.close()
    wall = time.perf_counter() - started
    warm = [m for t, m in rss if t >= min(10.0, seconds / 4)]
    print(
        f"soak: {seconds:g}s, {args.soak_clients} clients: {ok:,} ok ({ok / wall:,.0f}/s), "
        f"failed {sum(failures.values())} {failures or ''}; versions answering {sorted(versions)}"
    )
    print(
        f"server RSS MiB ({args.grpc_processes} process(es)): after warm-up {warm[0]:.0f}, "
        f"end {rss[-1][1]:.0f}, "
        f"peak {max(m for _, m in rss):.0f}"
    )


def soak(args: argparse.Namespace, base: str) -> None:
    work = tempfile.mkdtemp(prefix="mtrec-soak-")
    try:
        model_dir = os.path.join(work, "models", args.model_name)
        shutil.copytree(latest_version_dir(base, args.model_name), os.path.join(model_dir, "1"))
        conf = os.path.join(work, "models.conf")
        with open(conf, "w", encoding="utf-8") as out:
            out.write(model_config(args.model_name, model_dir))
        with open(metadata_path(os.path.join(model_dir, "1")), encoding="utf-8") as handle:
            info = json.load(handle)
        dtypes = input_dtypes(os.path.join(model_dir, "1"))
        inputs = workloads(info["num_users"], info["num_movies"], dtypes)["retrieve"]
        payloads = serialised_requests(args.model_name, F.SIGNATURE_RETRIEVE, inputs)
        command = [
            *(sys.executable, "-c", SERVE, "--model-config-file", conf),
            *("--model-config-file-poll-wait-seconds", "1", "--poll-seconds", "0.5"),
            *("--host", "127.0.0.1", "--port", "0", "--keep-versions", "1"),
            *("--inter-op-threads", str(args.inter_op_threads), "--workers", str(args.workers)),
            *("--grpc-processes", str(args.grpc_processes)),
        ]
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)
        try:
            port = _port(_wait_for_start(process))
            asyncio.run(_soak(args, port, process.pid, payloads, model_dir, conf))
        finally:
            process.terminate()
            process.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(rows: list[dict], floor: dict[int, dict]) -> None:
    print(
        "| workload | clients | server p50 ms | server p99 ms | server req/s | in-process p50 ms "
        "| in-process p99 ms | in-process req/s | p50 ratio | req/s ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        s, p = row["server"], row["in_process"]
        print(
            f"| {row['workload']} | {row['clients']} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
            f"{s['rps']:,.0f} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['rps']:,.0f} | "
            f"{s['p50_ms'] / p['p50_ms']:.2f}x | {p['rps'] / s['rps']:.2f}x |"
        )
    if floor:
        print()
        print("gRPC floor (same server machinery, empty handler, same client), and the server's")
        print("retrieve against floor + model call (p50s added; per-request times added):")
        print(
            "| clients | floor p50 ms | floor req/s | floor+model p50 ms | floor+model req/s "
            "| server p50 / (floor+model) | (floor+model) req/s / server |"
        )
        print("|---|---|---|---|---|---|---|")
        for clients, f in floor.items():
            row = next(r for r in rows if r["workload"] == "retrieve" and r["clients"] == clients)
            s, p = row["server"], row["in_process"]
            p50 = f["p50_ms"] + p["p50_ms"]
            rps = 1 / (1 / f["rps"] + 1 / p["rps"])
            print(
                f"| {clients} | {f['p50_ms']:.2f} | {f['rps']:,.0f} | {p50:.2f} | {rps:,.0f} | "
                f"{s['p50_ms'] / p50:.2f}x | {rps / s['rps']:.2f}x |"
            )


def cpu_list(text: str) -> set[int]:
    try:
        cpus = {int(part) for part in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of cores: {text!r}") from None
    unknown = cpus - set(range(os.cpu_count() or 1))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"core {min(unknown)} does not exist (this machine has 0..{(os.cpu_count() or 1) - 1})"
        )
    return cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-base-path", help="an export base (<base>/<name>/<version>/)")
    source.add_argument("--data-dir", help="a raw ml-100k folder: train and export first")
    parser.add_argument("--model-name", default="mtrec")
    parser.add_argument(
        "--epochs", type=int, default=3, help="with --data-dir (default: %(default)s)"
    )
    parser.add_argument(
        "--clients", default="1,8,32", help="concurrency levels (default: %(default)s)"
    )
    parser.add_argument(
        "--requests", type=int, default=3000, help="per level (default: %(default)s)"
    )
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="cap per level (default: %(default)s)"
    )
    parser.add_argument(
        "--inter-op-threads", type=int, default=1, help="server and in-process alike"
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="server and in-process alike (default: %(default)s, the server's; 0: TF's)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="server gRPC threads (0: its default)"
    )
    parser.add_argument(
        "--grpc-processes", type=int, default=1, help="server gRPC processes (default: %(default)s)"
    )
    parser.add_argument(
        "--server-cpus",
        type=cpu_list,
        help="confine the server and the floor server to these cores, as a Kubernetes pod "
        "with exclusive cores is (comma-separated core numbers; default: any core)",
    )
    parser.add_argument(
        "--batching", action=argparse.BooleanOptionalAction, default=True, help="server batching"
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure an empty-handler gRPC server (default: on)",
    )
    parser.add_argument(
        "--in-process",
        choices=("session", "function"),
        default="session",
        help="the in-process model call: the server's own (a TF1 Session callable, default) "
        "or the TF2 signature function",
    )
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--soak", type=float, help="run the soak for this many seconds instead")
    parser.add_argument("--soak-clients", type=int, default=16, help="default: %(default)s")
    args = parser.parse_args()

    if args.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    base = args.model_base_path
    if base is None:
        base = build_export(
            args.data_dir, tempfile.mkdtemp(prefix="mtrec-bench-"), args.model_name, args.epochs
        )
    if args.soak:
        soak(args, base)
        return
    version_dir = latest_version_dir(base, args.model_name)
    with open(metadata_path(version_dir), encoding="utf-8") as handle:
        info = json.load(handle)
    session = args.in_process == "session"
    if session:
        calls = SessionCalls(version_dir, args.inter_op_threads, args.intra_op_threads)
    else:
        saved_model = tf.saved_model.load(version_dir)
    inputs = workloads(info["num_users"], info["num_movies"], input_dtypes(version_dir))
    if "rank" in inputs:  # rank what retrieve returns, as `mtrec query` does: known movies only
        retrieve = (
            calls.function(F.SIGNATURE_RETRIEVE)
            if session
            else saved_model.signatures[F.SIGNATURE_RETRIEVE]
        )
        for rank_item, retrieve_item in zip(inputs["rank"], inputs["retrieve"], strict=True):
            got = retrieve(**retrieve_item)
            if session:
                names = sorted(calls.outputs[F.SIGNATURE_RETRIEVE])
                movie_ids = got[names.index(F.OUT_MOVIE_IDS)]
            else:
                movie_ids = got[F.OUT_MOVIE_IDS].numpy()
            movies = movie_ids[0][:RANK_BATCH]
            rank_item[F.MOVIE_ID] = movies
            rank_item[F.USER_ID] = rank_item[F.USER_ID][: len(movies)]
    levels = [int(c) for c in args.clients.split(",")]
    payloads = {
        workload: serialised_requests(args.model_name, SIGNATURES[workload], inputs[workload])
        for workload in inputs
    }

    rows = []
    server, port, workers = start_server(args, base)
    try:
        for workload in inputs:
            signature = SIGNATURES[workload]
            for clients in levels:
                local = run_in_process(
                    calls.function(signature) if session else saved_model.signatures[signature],
                    inputs[workload],
                    clients,
                    args.requests,
                    args.seconds,
                    session,
                )
                remote = run_grpc(
                    f"127.0.0.1:{port}", payloads[workload], clients, args.requests, args.seconds
                )
                rows.append(
                    {
                        "workload": workload,
                        "clients": clients,
                        "server": remote,
                        "in_process": local,
                    }
                )
                print(
                    f"{workload:<8} {clients:>2} clients: server p50 {remote['p50_ms']:.2f} ms "
                    f"p99 {remote['p99_ms']:.2f} ms {remote['rps']:,.0f}/s | in-process p50 "
                    f"{local['p50_ms']:.2f} ms p99 {local['p99_ms']:.2f} ms {local['rps']:,.0f}/s",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=30)

    floor: dict[int, dict] = {}
    if args.floor:
        echoes, port = start_echo_server(workers, args.grpc_processes, args.server_cpus)
        try:
            for clients in levels:
                floor[clients] = run_grpc(
                    f"127.0.0.1:{port}", payloads["retrieve"], clients, args.requests, args.seconds
                )
        finally:
            for echo in echoes:
                echo.terminate()
                echo.wait(timeout=30)

    print()
    print(
        f"{os.cpu_count()} cores; export {version_dir}; retrieve = 1 user, rank = {RANK_BATCH} pairs "
        f"per request; server: {args.grpc_processes} process(es) x {workers} gRPC threads"
        f"{' on cores ' + ','.join(map(str, sorted(args.server_cpus))) if args.server_cpus else ''}, "
        f"batching {'on' if args.batching else 'off'}; "
        f"in-process: {args.in_process} calls"
    )
    print_table(rows, floor)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"export": version_dir, "rows": rows, "floor": floor}, out, indent=2)


if __name__ == "__main__":
    main()
