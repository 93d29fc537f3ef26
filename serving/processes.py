"""Several processes answering gRPC on one port (`mtrec serve --grpc-processes N`).

Why: one Python process serves at most what its GIL lets through (measured on 2 cores: ~1.1
cores busy, whatever the thread count), while the cores have room. The processes bind the same
port with SO_REUSEPORT and the kernel spreads connections over them; each loads the configured
models and polls their folders and the config file itself, as replicas do.

What stays one server:
- `HandleReloadConfigRequest`, whichever process it reaches, is applied in every process, one
  reload at a time (each process has a control socket in a shared folder), before it is
  answered;
- metrics are summed over the processes (prometheus-client's multiprocess mode), served by the
  first process, which also serves REST;
- the first process is ready (health, /readyz) only while every process has a warmed-up version
  of every model; if one exits, the first process stops (exit status 1) and its orchestrator
  restarts the whole;
- each started process ends when the first one does, even if that one is killed (its stdin is a
  pipe from the first: end of file means stop).
"""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc

from serving.config import METRICS_ENV, ServerConfig
from serving.errors import RequestError, ServerStartError

log = logging.getLogger(__name__)

GROUP_ENV = "MTREC_SERVE_GROUP_DIR"  # the group's folder: control sockets, metrics/
CONFIG_ENV = "MTREC_SERVE_CONFIG"  # a started process's ServerConfig, as JSON
START_SECONDS = 600.0  # a started process importing TensorFlow and loading every model
RELOAD_SECONDS = 600.0  # a forwarded reload loads the new configuration's models
STOP_SECONDS = 10.0  # beyond the grace period, before SIGKILL


def prepare_group(config: ServerConfig) -> str | None:
    """For the first of several processes: create the group's folder (returned; the caller
    removes it at the end) and set its environment, before prometheus-client is imported (its
    multiprocess mode is chosen at import). None otherwise."""
    if config.grpc_processes <= 1 or os.environ.get(GROUP_ENV):
        return None
    folder = tempfile.mkdtemp(prefix="mtrec-serve-")
    os.makedirs(os.path.join(folder, "metrics"))
    os.environ[GROUP_ENV] = folder
    os.environ[METRICS_ENV] = os.path.join(folder, "metrics")
    return folder


def control_target(folder: str, pid: int) -> str:
    return f"unix:{os.path.join(folder, f'{pid}.sock')}"


class ControlEndpoint:
    """This process's private endpoint (a Unix socket in the group folder): ModelService that
    applies a reload here only, and this process's health."""

    def __init__(self, folder: str, model_servicer, health_servicer):
        self.server = grpc.server(futures.ThreadPoolExecutor(2, thread_name_prefix="control"))
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(model_servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        target = control_target(folder, os.getpid())
        try:
            self.server.add_insecure_port(target)
        except RuntimeError as error:  # e.g. a path over the 107 bytes a Unix socket takes
            raise ServerStartError(f"cannot listen on {target} ({error})") from None
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0).wait()


class GroupReloads:
    """A HandleReloadConfigRequest in a group, whichever process it reaches: the first process
    applies it, then has each companion apply it (control sockets), one reload at a time, so
    every process ends with the same configuration; a companion relays it to the first."""

    def __init__(self, folder: str, registry, first: bool):
        self.folder = folder
        self.registry = registry
        self.first = first
        self._lock = threading.Lock()

    def apply(self, request, specs) -> None:
        if not self.first:
            _reload(self.folder, os.getppid(), request)  # the first process started this one
            return
        own = f"{os.getpid()}.sock"
        with self._lock:
            self.registry.apply(specs)
            for name in sorted(os.listdir(self.folder)):
                if name.endswith(".sock") and name != own:
                    _reload(self.folder, int(name.removesuffix(".sock")), request)


def _reload(folder: str, pid: int, request) -> None:
    """HandleReloadConfigRequest on one process's control socket; RequestError if it fails."""
    with grpc.insecure_channel(control_target(folder, pid)) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        try:
            stub.HandleReloadConfigRequest(request, timeout=RELOAD_SECONDS)
        except grpc.RpcError as error:
            raise RequestError(
                grpc.StatusCode.INTERNAL,
                f"gRPC process {pid} did not apply the configuration: {error.details()}",
            ) from None


class StartedProcesses:
    """The first process's N-1 companions: started, waited for, watched, stopped."""

    def __init__(self, config: ServerConfig, port: int, folder: str):
        self.folder = folder
        self._stopping = threading.Event()
        companion = dataclasses.replace(config, port=port, rest_port=0, grpc_processes=1)
        env = {**os.environ, CONFIG_ENV: json.dumps(dataclasses.asdict(companion))}
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "serving.companion"], stdin=subprocess.PIPE, env=env
            )
            for _ in range(config.grpc_processes - 1)
        ]

    def wait_until_started(self, timeout: float = START_SECONDS) -> None:
        """Every companion started: its initial load done and its control endpoint answering
        (SERVING or not: with no version on disk yet, a server starts and waits for one)."""
        deadline = time.monotonic() + timeout
        for process in self.processes:
            while self._health(process) is None:
                if process.poll() is not None:
                    raise ServerStartError(
                        f"gRPC process {process.pid} exited with status {process.returncode} "
                        "while starting (its log is above)"
                    )
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"gRPC process {process.pid} did not start within {timeout:g}s"
                    )
                time.sleep(0.1)

    def serving(self) -> bool:
        """Every companion SERVING (each has a warmed-up version of every configured model)."""
        serving = health_pb2.HealthCheckResponse.SERVING
        return all(self._health(process) == serving for process in self.processes)

    def _health(self, process: subprocess.Popen) -> int | None:
        """The companion's health status; None when its control endpoint does not answer."""
        with grpc.insecure_channel(control_target(self.folder, process.pid)) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
            except grpc.RpcError:
                return None
        return reply.status

    def watch(self, on_exit) -> None:
        """Call on_exit(message) if a companion exits while the server is not stopping."""

        def watcher(process: subprocess.Popen) -> None:
            status = process.wait()
            if not self._stopping.is_set():
                on_exit(f"gRPC process {process.pid} exited with status {status}")

        for process in self.processes:
            threading.Thread(target=watcher, args=(process,), daemon=True).start()

    def stop(self, grace: float) -> None:
        """SIGTERM (they drain for `grace` seconds), then SIGKILL; their metrics retired."""
        self._stopping.set()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + STOP_SECONDS
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdin:
                process.stdin.close()
            _retire_metrics(process.pid)


def _retire_metrics(pid: int) -> None:
    from prometheus_client import multiprocess

    if os.environ.get(METRICS_ENV):
        multiprocess.mark_process_dead(pid)


def stop_when_stdin_closes(stop: threading.Event, orphaned: threading.Event) -> None:
    """A companion's lifeline: its stdin is a pipe from the first process, which ends when that
    process does, however it ends (a killed first process cannot remove the group folder: the
    companion that sees the end does)."""

    def read() -> None:
        try:
            while os.read(sys.stdin.fileno(), 4096):  # the raw descriptor: no buffer lock
                pass
            orphaned.set()
        finally:
            stop.set()

    threading.Thread(target=read, name="lifeline", daemon=True).start()
