"""The soak of bench/serving.py (`--soak SECONDS`): clients without pause through a version
switch, a config-file rewrite and a HandleReloadConfigRequest; failures by status and the
server's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import grpc
from google.protobuf import text_format
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
)

from bench.serving_load import (
    OWN_CONNECTION,
    PREDICT,
    REPO,
    SERVE,
    input_dtypes,
    latest_version_dir,
    port_of,
    serialised_requests,
    wait_for_start,
    workloads,
)
from components import features as F
from components.artifacts.model_versions import metadata_path


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
            port = port_of(wait_for_start(process))
            asyncio.run(_soak(args, port, process.pid, payloads, model_dir, conf))
        finally:
            process.terminate()
            process.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
