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
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Run as a script (python bench/serving.py): the repository root holds the `bench` package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

from bench.serving_load import (  # noqa: E402
    RANK_BATCH,
    SIGNATURES,
    SessionCalls,
    build_export,
    input_dtypes,
    latest_version_dir,
    run_grpc,
    run_in_process,
    serialised_requests,
    start_echo_server,
    start_server,
    workloads,
)
from bench.serving_soak import soak  # noqa: E402
from components import features as F  # noqa: E402
from components.artifacts.model_versions import metadata_path  # noqa: E402


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
