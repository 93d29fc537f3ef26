"""TF Serving's REST API, as an ASGI app served by uvicorn (h11) on its own event-loop thread.

- `POST /v1/models/NAME[/versions/N|/labels/L]:predict`: row format (`instances` ->
  `predictions`) or columnar (`inputs` -> `outputs`), `signature_name` optional;
- `GET /v1/models/NAME[/versions/N|/labels/L]`: each version's real state;
  `GET .../metadata`: signature defs;
- `GET /monitoring/prometheus/metrics`: Prometheus text;
- `GET /healthz`: liveness (always 200 while the process answers); `GET /readyz`: 200 only when
  every configured model has an AVAILABLE, warmed-up version, else 503.
Every error is JSON `{"error": "..."}`: 400 malformed, 404 unknown path or model, 405 wrong
method, 408 request not read in time, 413 body too large, 503 not ready or too many connections.
No Server header. Model calls run on a thread pool, never on the event loop.
"""

import asyncio
import logging
import re
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

import h11
import numpy as np
import uvicorn
from google.protobuf import json_format
from uvicorn.protocols.http.h11_impl import H11Protocol

from serving.errors import RequestError, invalid_argument, not_found
from serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.metrics import METRICS_PATH
from serving.models import ModelRegistry
from serving.predict import Predictor
from serving.rest_json import (
    columns_from_inputs,
    columns_from_instances,
    json_bytes,
    json_value,
    parse_json,
    to_array,
)
from serving.signatures import LoadedVersion, Signature

log = logging.getLogger(__name__)


LIVENESS_PATH = "/healthz"


READINESS_PATH = "/readyz"


JSON = b"application/json"


MAX_HEADER_BYTES = 64 * 1024


_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>\d{1,18})|/labels/(?P<label>[^/:]+))?"
    r"(?P<action>:predict|:classify|:regress|/metadata)?/?$"
)


class HttpError(Exception):
    """An HTTP-level refusal (405, 413, ...) outside the gRPC status mapping."""

    def __init__(self, status: int, message: str, headers: tuple = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _allow(method: str, allowed: str, path: str) -> None:
    if method != allowed:
        raise HttpError(
            405, f"{path} takes {allowed}, got {method}", ((b"allow", allowed.encode()),)
        )


class RestApi:
    """(method, path, body) -> (HTTP status, payload, content type); no sockets, so it is plain
    to test. A payload of bytes is sent as is; anything else as JSON."""

    def __init__(self, predictor: Predictor, metrics_text=None, ready=None):
        self.predictor = predictor
        self.registry: ModelRegistry = predictor.registry
        self.metrics_text = metrics_text or predictor.metrics.text
        self.ready = ready or self.registry.ready  # with companions: theirs too

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any, tuple]:
        try:
            return 200, self._route(method, path, body), ()
        except RequestError as error:
            return error.http_status, {"error": error.message}, ()
        except HttpError as error:
            return error.status, {"error": error.message}, error.headers
        except Exception as error:  # a bug must answer 500, not drop the connection
            log.exception("REST %s %s failed", method, path)
            return 500, {"error": f"internal error ({type(error).__name__})"}, ()

    def _route(self, method: str, path: str, body: bytes) -> Any:
        if path == METRICS_PATH:
            _allow(method, "GET", path)
            return self.metrics_text()
        if path == LIVENESS_PATH:
            _allow(method, "GET", path)
            return {"status": "alive"}
        if path == READINESS_PATH:
            _allow(method, "GET", path)
            return self._readiness()
        match = _ROUTE.match(path)
        if not match:
            raise not_found(
                f"no route {path!r}: use /v1/models/NAME[/versions/N|/labels/L][:predict|/metadata]"
            )
        name, action = match["name"], match["action"]
        version = int(match["version"]) if match["version"] else None
        label = match["label"] or ""
        if action in (":classify", ":regress"):
            _allow(method, "POST", path)
            raise HttpError(501, f"{action[1:]} is not implemented by this server: use :predict")
        if action == ":predict":
            _allow(method, "POST", path)
            return self._predict(name, version, label, parse_json(body))
        _allow(method, "GET", path)
        if action == "/metadata":
            return _metadata(self.registry.resolve(name, version, label))
        manager = self.registry.manager(name)
        if label:
            version = manager.resolve(None, label).version
        return {
            "model_version_status": [
                {
                    "version": str(state.version),
                    "state": state.state,
                    "status": {
                        "error_code": "UNKNOWN" if state.error else "OK",
                        "error_message": state.error,
                    },
                }
                for state in manager.states(version)
            ]
        }

    def _readiness(self) -> dict:
        waiting = sorted(n for n, m in self.registry.managers.items() if m.latest is None)
        if not self.registry.managers or waiting:
            raise HttpError(
                503, f"not ready: no version loaded yet for {', '.join(waiting) or '-'}"
            )
        if not self.ready():
            raise HttpError(503, "not ready: another gRPC process has not loaded every model yet")
        return {"status": "ready", "models": sorted(self.registry.managers)}

    def _predict(self, name: str, version: int | None, label: str, request: Any) -> dict:
        if not isinstance(request, dict):
            raise invalid_argument("the request body must be a JSON object")
        signature_name = request.get("signature_name", "")
        if not isinstance(signature_name, str):
            raise invalid_argument('"signature_name" must be a string')
        has_rows, has_columns = "instances" in request, "inputs" in request
        if has_rows == has_columns:
            raise invalid_argument('the request must hold exactly one of "instances" or "inputs"')

        def decode(signature: Signature) -> dict[str, np.ndarray]:
            if has_rows:
                columns = columns_from_instances(signature, request["instances"])
            else:
                columns = columns_from_inputs(signature, request["inputs"])
            arrays = {n: to_array(signature, n, value) for n, value in columns.items()}
            signature.validate(arrays)
            return arrays

        _, _, outputs = self.predictor.predict("rest", name, version, label, signature_name, decode)
        lists = {n: json_value(array) for n, array in outputs.items()}
        if has_columns:
            return {"outputs": next(iter(lists.values())) if len(lists) == 1 else lists}
        if len(lists) == 1:
            return {"predictions": next(iter(lists.values()))}
        rows = len(next(iter(lists.values()))) if lists else 0
        return {"predictions": [{n: lists[n][i] for n in lists} for i in range(rows)]}


def _metadata(loaded: LoadedVersion) -> dict:
    return {
        "model_spec": {
            "name": loaded.model_name,
            "signature_name": "",
            "version": str(loaded.version),
        },
        "metadata": {
            "signature_def": {
                "signature_def": {
                    name: json_format.MessageToDict(sig, preserving_proto_field_name=True)
                    for name, sig in loaded.signature_defs.items()
                }
            }
        },
    }


def _raw_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 JSON error response, for refusals made before any ASGI app runs."""
    body = json_bytes({"error": message})
    reason = HTTPStatus(status).phrase.encode()
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason, len(body))
    ) + body


def make_protocol(read_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol, plus: a request (headers and body) must arrive whole within
    `read_timeout` of its first byte (stalled uploads cannot pin connections), connections
    beyond `max_connections` are refused at once with a JSON 503, and malformed HTTP gets a
    JSON 400."""

    class DeadlineProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(
                    _raw_response(503, f"too many connections (limit {max_connections})")
                )
                transport.close()
                return
            # Until the first byte: the idle timeout (uvicorn's keep-alive timer).
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

        def data_received(self, data: bytes) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(read_timeout, self._read_timed_out)
            super().data_received(data)
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
                self._clear_deadline()

        def on_response_complete(self) -> None:
            self._clear_deadline()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._clear_deadline()
            super().connection_lost(exc)

        def _clear_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _read_timed_out(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(
                    _raw_response(408, f"the request did not arrive within {read_timeout:g}s")
                )
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_raw_response(400, f"malformed HTTP request ({msg})"))
            self.transport.close()

    return DeadlineProtocol


class AsgiApp:
    """The ASGI side: read the body (bounded), run `RestApi.handle` on the thread pool, reply."""

    def __init__(self, api: RestApi, executor: ThreadPoolExecutor, max_body_bytes: int):
        self.api = api
        self.executor = executor
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        loop = asyncio.get_running_loop()
        status, payload, headers = await loop.run_in_executor(
            self.executor, self.api.handle, scope["method"], scope["path"], body
        )
        if isinstance(payload, bytes):
            await _send(send, status, payload, METRICS_CONTENT_TYPE.encode(), headers)
        else:
            await _send(send, status, json_bytes(payload), JSON, headers)

    async def _read_body(self, scope, receive, send) -> bytes | None:
        limit = self.max_body_bytes
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                await self._too_large(send, int(value))
                return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(send, size)
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _too_large(self, send, size: int) -> None:
        message = {
            "error": f"request body of {size}+ bytes exceeds the limit of "
            f"{self.max_body_bytes} (--max-request-mib)"
        }
        await _send(send, 413, json_bytes(message), JSON, ((b"connection", b"close"),))


async def _send(send, status: int, body: bytes, content_type: bytes, headers=()) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RestServer:
    """uvicorn on a socket bound here (so the port is known at once), in its own thread."""

    def __init__(
        self,
        app: AsgiApp,
        host: str,
        port: int,
        *,
        read_timeout: float,
        idle_timeout: float,
        max_connections: int,
        grace_seconds: float,
    ):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=1024)
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            http=make_protocol(read_timeout, max_connections),
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=max(1, round(idle_timeout)),
            timeout_graceful_shutdown=max(1, round(grace_seconds)),
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="rest", daemon=True)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.socket]))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self.socket.close()
