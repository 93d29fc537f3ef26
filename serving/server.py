"""The model server: a model registry + gRPC (PredictionService, ModelService, health) + optional
REST, with version polling, config-file re-reading and graceful shutdown; with
`--grpc-processes N`, the first of N processes sharing the gRPC port (serving/processes.py)."""

import logging
import os
import socket
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from components import storage
from serving.config import ServerConfig
from serving.errors import ServerStartError
from serving.grpc_api import ModelServicer, PredictionServicer
from serving.metrics import ServingMetrics
from serving.model_config import read_model_config
from serving.models import ModelRegistry, ModelSpec, VersionPolicy
from serving.predict import Predictor
from serving.processes import GROUP_ENV, ControlEndpoint, GroupReloads, StartedProcesses
from serving.rest_api import AsgiApp, RestApi, RestServer
from serving.signatures import Limits

log = logging.getLogger(__name__)

PREDICTION_SERVICE = "tensorflow.serving.PredictionService"
MODEL_SERVICE = "tensorflow.serving.ModelService"

__all__ = ["ModelServer", "ServerConfig"]  # ServerConfig re-exported: callers build both here


def model_specs(config: ServerConfig) -> list[ModelSpec]:
    """The configured models: the config file's, or the one-model shorthand (whose
    --model-base-path is the export base, holding <model-name>/<version>/)."""
    if config.model_config_file:
        return read_model_config(config.model_config_file)
    remote = storage.is_remote(config.model_base_path)
    if not remote and not os.path.isdir(config.model_base_path):
        raise ServerStartError(
            f"--model-base-path {config.model_base_path}: not a folder (expected "
            f"<base>/{config.model_name}/<version>/saved_model.pb)"
        )
    return [
        ModelSpec(
            config.model_name,
            storage.join(config.model_base_path, config.model_name),
            VersionPolicy(num_versions=config.keep_versions),
        )
    ]


def check_port_free(host: str, port: int) -> None:
    """ServerStartError when something listens on host:port (probed without SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ServerStartError(
                f"cannot listen on {host}:{port} ({error.strerror or error})"
            ) from None


class ModelServer:
    """Start, serve, stop. `start()` loads what it can before it returns; health and /readyz
    turn SERVING only once every configured model has an AVAILABLE, warmed-up version."""

    def __init__(self, config: ServerConfig, companion: bool = False):
        self.config = config.check()
        self.companion = companion  # started by the first process of a group
        self.group = (
            os.environ.get(GROUP_ENV) if companion or config.grpc_processes > 1 else None
        )  # the group's folder, when several processes share the port
        if (companion or config.grpc_processes > 1) and not self.group:
            raise ServerStartError(
                f"--grpc-processes {config.grpc_processes}: start the server with `mtrec serve`"
            )
        self.metrics = ServingMetrics()
        limits = Limits(
            config.max_batch_size,
            config.max_dim_size,
            config.batching,
            self.metrics.on_batch,
            config.inter_op_threads,
            config.intra_op_threads,
            config.max_string_bytes,
            self.metrics.active,
        )
        self.registry = ModelRegistry(
            model_specs(config), limits, config.warm_up, self.metrics.on_load
        )
        self.predictor = Predictor(self.registry, self.metrics)
        self.health = health.HealthServicer()
        self.port: int | None = None
        self.rest_port: int | None = None
        self._grpc: grpc.Server | None = None
        self._rest: RestServer | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self._threads: list[threading.Thread] = []
        self._control: ControlEndpoint | None = None
        self._companions: StartedProcesses | None = None
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._failed = threading.Event()
        self.failure = ""  # why the server stopped on its own (a companion process exited)
        self._set_health(False)

    def _set_health(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        for service in ("", PREDICTION_SERVICE, MODEL_SERVICE):
            self.health.set(service, status)

    def ready(self) -> bool:
        """Every configured model has an AVAILABLE version, in every gRPC process (the health
        follows the companions' at each poll of the model folders)."""
        if self.group and not self.companion:
            return (
                self._companions is not None
                and self.registry.ready()
                and self._companions.serving()
            )
        return self.registry.ready()

    def _update_health(self) -> None:
        if not self._stop.is_set():
            self._set_health(self.ready())

    def start(self) -> "ModelServer":
        config = self.config
        self.registry.add_listener(self._update_health)
        self.registry.poll()
        for name, manager in self.registry.managers.items():
            if manager.latest is None:
                log.warning(
                    "no loadable version of %s under %s yet: NOT_SERVING until one appears",
                    name,
                    manager.model_dir,
                )
        workers = config.grpc_workers
        size = config.max_request_bytes
        if self.group and not self.companion and config.port:
            # SO_REUSEPORT would let this group share a port another server listens on.
            check_port_free(config.host, config.port)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            options=[
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                ("grpc.so_reuseport", 1 if self.group else 0),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.predictor), server
        )
        self._reloads = (
            GroupReloads(self.group, self.registry, first=not self.companion)
            if self.group
            else None
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(self.registry, apply=self._reloads and self._reloads.apply), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = (
            f"[{config.host}]:{config.port}"
            if ":" in config.host
            else (f"{config.host}:{config.port}")
        )
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as error:
            raise ServerStartError(f"cannot listen on {address} ({error})") from None
        server.start()
        self._grpc = server
        try:
            if self.group:
                self._start_group()
            if config.rest_port != 0:
                self._start_rest()
        except BaseException:
            self.stop(grace=0)  # nothing may keep running behind a failed start
            raise
        self._update_health()  # with companions: now that they run
        if config.poll_seconds > 0:
            self._spawn(self.registry.watch, config.poll_seconds, self._stop, name="model-poller")
        if config.model_config_file and config.model_config_file_poll_wait_seconds > 0:
            self._spawn(self._watch_config, name="config-poller")
        log.info(
            "serving %s: gRPC on %s:%d%s (%d handler threads%s, batching %s, polling %s)",
            ", ".join(f"{m.name} from {m.model_dir}" for m in self.registry.managers.values()),
            config.host,
            self.port,
            f", REST on {config.host}:{self.rest_port}" if self.rest_port else "",
            workers,
            f" in each of {config.grpc_processes} processes" if self._companions else "",
            "on" if config.batching else "off",
            f"every {config.poll_seconds:g}s" if config.poll_seconds > 0 else "off",
        )
        return self

    def _start_group(self) -> None:
        """This process's control endpoint; the first process also starts its companions on
        the port it got and waits until they serve."""
        # The first process coordinates reloads arriving on its control socket (relayed by a
        # companion); a companion applies what arrives on its own.
        coordinate = None if self.companion else self._reloads.apply
        self._control = ControlEndpoint(
            self.group, ModelServicer(self.registry, apply=coordinate), self.health
        )
        if self.companion:
            return
        self._companions = StartedProcesses(self.config, self.port, self.group)
        self._companions.wait_until_started()
        self._companions.watch(self._fail)

    def _fail(self, message: str) -> None:
        log.error("%s: stopping the server", message)
        self.failure = message
        self._failed.set()

    def _start_rest(self) -> None:
        config = self.config
        port = max(config.rest_port, 0)  # -1 asks for a free port (tests)
        self._executor = futures.ThreadPoolExecutor(config.grpc_workers, thread_name_prefix="rest")
        app = AsgiApp(
            RestApi(self.predictor, ready=self.ready), self._executor, config.max_request_bytes
        )
        try:
            self._rest = RestServer(
                app,
                config.host,
                port,
                read_timeout=config.rest_read_timeout_seconds,
                idle_timeout=config.rest_idle_timeout_seconds,
                max_connections=config.rest_max_connections,
                grace_seconds=config.grace_seconds,
            )
        except OSError as error:
            raise ServerStartError(
                f"cannot listen on {config.host}:{port} for REST ({error.strerror or error})"
            ) from None
        self.rest_port = self._rest.port
        self._rest.start()

    def _watch_config(self) -> None:
        """Re-read --model-config-file every poll period; a bad file is logged and ignored."""
        config = self.config
        last = self.registry.specs  # applied only when the file changes, so a reload request
        while not self._stop.wait(config.model_config_file_poll_wait_seconds):  # stays until then
            try:
                specs = read_model_config(config.model_config_file)
                if specs != last:
                    log.info("model config changed: applying %s", config.model_config_file)
                    self.registry.apply(specs)
                    last = specs
            except Exception as error:  # keep the running configuration
                log.error("model config not applied (%s)", error)

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
        grace = self.config.grace_seconds if grace is None else grace
        companions = None
        if self._companions is not None:  # they drain while this process does
            companions = threading.Thread(target=self._companions.stop, args=(grace,))
            companions.start()
        if self._rest is not None:
            self._rest.stop()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if companions is not None:
            companions.join()
        if self._control is not None:
            self._control.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for thread in self._threads:
            thread.join(timeout=5)
        self._stopped.set()
        log.info("stopped")

    def wait(self, stop: threading.Event) -> None:
        """Block until `stop` is set (signal handlers set it), then shut down."""
        while not stop.wait(0.5) and not self._failed.is_set():
            pass
        self.stop()

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=0)
