"""The model server: model manager + gRPC (PredictionService, ModelService, health) + optional
REST, with version polling and graceful shutdown."""

import logging
import os
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.errors import ServerStartError
from serving.grpc_api import ModelServicer, PredictionServicer
from serving.models import LoadedVersion, ModelManager
from serving.rest_api import RestApi, RestServer

log = logging.getLogger(__name__)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def default_workers() -> int:
    """gRPC handler threads: 8 per core, 8 to 32. Most of them wait (for the batcher, or for
    TF kernels, which drop the GIL); with fewer than the clients in flight, requests queue
    before the batcher instead of merging in it (measured on 2 cores: 16 threads give ~1.4x
    the throughput of 4 at 32 clients, and 32 no more than 16)."""
    return min(32, max(8, 8 * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class ServerConfig:
    """What `mtrec serve` configures."""

    model_base_path: str
    model_name: str = "mtrec"
    host: str = "0.0.0.0"
    port: int = 8500  # 0: pick a free port (tests)
    rest_port: int = 0  # 0: no REST API; -1: a free port (tests)
    poll_seconds: float = 2.0  # 0: load once, never poll
    keep_versions: int = 1  # versions kept loaded for pinned requests (the newest first)
    workers: int = 0  # gRPC handler threads; 0: default_workers()
    max_batch_size: int = 4096  # refuse larger batches (0: no limit)
    grace_seconds: float = 5.0  # in-flight requests get this long at shutdown
    warm_up: bool = True
    batching: bool = True  # merge concurrent requests to a signature (rows are independent)


class ModelServer:
    """Start, serve, stop. `start()` loads the newest loadable version before it returns."""

    def __init__(self, config: ServerConfig):
        self.config = config
        if not os.path.isdir(config.model_base_path):
            raise ServerStartError(
                f"--model-base-path {config.model_base_path}: not a folder (expected "
                f"<base>/{config.model_name}/<version>/saved_model.pb)"
            )
        self.manager = ModelManager(
            config.model_base_path,
            config.model_name,
            keep_versions=config.keep_versions,
            max_batch_size=config.max_batch_size,
            warm_up=config.warm_up,
            batching=config.batching,
        )
        self.health = health.HealthServicer()
        self.port: int | None = None
        self.rest_port: int | None = None
        self._grpc: grpc.Server | None = None
        self._rest: RestServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status) -> None:
        for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
            self.health.set(service, status)

    def _on_new_version(self, loaded: LoadedVersion) -> None:
        if not self._stop.is_set():
            self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> "ModelServer":
        config = self.config
        self.manager.add_listener(self._on_new_version)
        self.manager.poll()
        if self.manager.latest is None:
            log.warning(
                "no loadable version of %s under %s yet: health is NOT_SERVING until one appears",
                config.model_name,
                self.manager.model_dir,
            )
        workers = config.workers or default_workers()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.manager), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.manager), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{config.host}:{config.port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise ServerStartError(f"cannot listen on {address} ({error})") from None
        server.start()
        self._grpc = server
        if config.rest_port != 0:
            self._start_rest()
        if config.poll_seconds > 0:
            self._spawn(self.manager.watch, config.poll_seconds, self._stop, name="model-poller")
        log.info(
            "serving %s from %s: gRPC on %s:%d%s (%d handler threads, batching %s, polling %s)",
            config.model_name,
            self.manager.model_dir,
            config.host,
            self.port,
            f", REST on {config.host}:{self.rest_port}" if self.rest_port else "",
            workers,
            "on" if config.batching else "off",
            f"every {config.poll_seconds:g}s" if config.poll_seconds > 0 else "off",
        )
        return self

    def _start_rest(self) -> None:
        port = max(self.config.rest_port, 0)  # -1 asks for a free port (tests)
        try:
            self._rest = RestServer((self.config.host, port), RestApi(self.manager))
        except OSError as error:
            raise ServerStartError(
                f"cannot listen on {self.config.host}:{port} for REST ({error})"
            ) from None
        self.rest_port = self._rest.server_address[1]
        self._spawn(self._rest.serve_forever, 0.2, name="rest")

    def _spawn(self, target, *args, name: str) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, grace: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish (up to `grace` seconds), stop polling."""
        if self._stop.is_set():
            self._stopped.wait()
            return
        self._stop.set()
        log.info("shutting down")
        self.health.enter_graceful_shutdown()
        if self._rest is not None:
            self._rest.shutdown()
            self._rest.server_close()
        if self._grpc is not None:
            self._grpc.stop(self.config.grace_seconds if grace is None else grace).wait()
        for thread in self._threads:
            thread.join(timeout=5)
        self._stopped.set()
        log.info("stopped")

    def wait(self, stop: threading.Event) -> None:
        """Block until `stop` is set (signal handlers set it), then shut down."""
        while not stop.wait(1.0):
            pass
        self.stop()

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)
