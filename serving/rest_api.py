"""TF Serving's REST API on the standard library's HTTP server.

- `POST /v1/models/NAME[/versions/N]:predict` with `{"signature_name": ..., "instances": [...]}`
  (row format, answered with `{"predictions": [...]}`) or `{"inputs": ...}` (columnar, answered
  with `{"outputs": ...}`);
- `GET /v1/models/NAME[/versions/N]`: version status; `GET .../metadata`: signature defs.
Errors are `{"error": "..."}` with 400 / 404 / 503, as TF Serving answers.
"""

import json
import logging
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from google.protobuf import json_format

from serving.errors import RequestError, invalid_argument, not_found
from serving.models import LoadedVersion, ModelManager, Signature

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024
_ROUTE = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<action>:predict|/metadata)?/?$"
)
_INT32 = np.iinfo(np.int32)


class RestApi:
    """Request -> (HTTP status, JSON payload); no sockets, so it is plain to test and reuse."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        try:
            return 200, self._route(method, path.split("?", 1)[0], body)
        except RequestError as error:
            return error.http_status, {"error": error.message}
        except Exception as error:  # a bug must answer 500, not drop the connection
            log.exception("REST %s %s failed", method, path)
            return 500, {"error": f"internal error ({type(error).__name__}: {error})"}

    def _route(self, method: str, path: str, body: bytes) -> Any:
        match = _ROUTE.match(path)
        if not match:
            raise not_found(
                f"no route {path!r}: use /v1/models/NAME[/versions/N][:predict|/metadata]"
            )
        name, action = match["name"], match["action"]
        version = int(match["version"]) if match["version"] else None
        label = match["label"] or ""
        if action == ":predict":
            if method != "POST":
                raise invalid_argument(f"{path} takes POST, got {method}")
            loaded = self.manager.resolve(name, version, label)
            return self._predict(loaded, _parse_json(body))
        if method != "GET":
            raise invalid_argument(f"{path} takes GET, got {method}")
        if action == "/metadata":
            return self._metadata(self.manager.resolve(name, version, label))
        if label:
            raise invalid_argument("version labels are not configured on this server")
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
                for state in self.manager.states(name, version)
            ]
        }

    @staticmethod
    def _metadata(loaded: LoadedVersion) -> dict:
        return {
            "model_spec": {"name": loaded.model_name, "version": str(loaded.version)},
            "metadata": {
                "signature_def": {
                    "signature_def": {
                        name: json_format.MessageToDict(sig, preserving_proto_field_name=True)
                        for name, sig in loaded.signature_defs.items()
                    }
                }
            },
        }

    def _predict(self, loaded: LoadedVersion, request: Any) -> dict:
        if not isinstance(request, dict):
            raise invalid_argument("the request body must be a JSON object")
        signature = loaded.signature(request.get("signature_name") or "")
        has_rows, has_columns = "instances" in request, "inputs" in request
        if has_rows == has_columns:
            raise invalid_argument('the request must hold exactly one of "instances" or "inputs"')
        if has_rows:
            columns = _columns_from_instances(signature, request["instances"])
        else:
            columns = _columns_from_inputs(signature, request["inputs"])
        arrays = {name: _to_array(signature, name, value) for name, value in columns.items()}
        outputs = signature.run(arrays)
        if has_columns:
            if len(outputs) == 1:
                return {"outputs": next(iter(outputs.values())).tolist()}
            return {"outputs": {name: array.tolist() for name, array in outputs.items()}}
        lists = {name: array.tolist() for name, array in outputs.items()}
        rows = len(next(iter(lists.values()))) if lists else 0
        if len(lists) == 1:
            return {"predictions": next(iter(lists.values()))}
        return {"predictions": [{name: lists[name][i] for name in lists} for i in range(rows)]}


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid_argument(f"the request body is not valid JSON ({error})") from None


def _columns_from_instances(signature: Signature, instances: Any) -> dict[str, list]:
    """Row format: a list of objects naming every input, or of bare values for one input."""
    if not isinstance(instances, list) or not instances:
        raise invalid_argument('"instances" must be a non-empty list')
    if all(isinstance(row, dict) for row in instances):
        names = set(instances[0])
        for index, row in enumerate(instances):
            if set(row) != names:
                raise invalid_argument(
                    f"instance {index} names inputs {sorted(row)}, instance 0 {sorted(names)}"
                )
        return {name: [row[name] for row in instances] for name in names}
    if len(signature.inputs) != 1:
        raise invalid_argument(
            f"signature {signature.name!r} has inputs {', '.join(sorted(signature.inputs))}: "
            "each instance must be an object naming them"
        )
    return {next(iter(signature.inputs)): instances}


def _columns_from_inputs(signature: Signature, inputs: Any) -> dict[str, Any]:
    """Columnar format: an object of named inputs, or one bare value for a one-input signature."""
    if isinstance(inputs, dict):
        return inputs
    if len(signature.inputs) != 1:
        raise invalid_argument(
            f'signature {signature.name!r} has several inputs: "inputs" must be an object naming '
            f"{', '.join(sorted(signature.inputs))}"
        )
    return {next(iter(signature.inputs)): inputs}


def _to_array(signature: Signature, name: str, value: Any) -> np.ndarray:
    """JSON values -> an array of the signature's dtype; no silent rounding or wrapping."""
    expected = signature.numpy_dtypes.get(name)
    if expected is None:
        raise invalid_argument(
            f"signature {signature.name!r} has no input named {name!r}; "
            f"its inputs are {', '.join(sorted(signature.inputs))}"
        )
    try:
        array = np.asarray(value)
    except ValueError:
        array = None
    if array is None or array.dtype == object:
        raise invalid_argument(f"input {name!r} is not a rectangular array of numbers")
    if array.size == 0:
        return array.astype(expected)
    if expected.kind in "iu":
        if array.dtype.kind not in "iu":
            raise invalid_argument(
                f"input {name!r} of signature {signature.name!r} must be {expected.name}, "
                f"got {array.dtype.name} values"
            )
        info = np.iinfo(expected)
        if array.min() < info.min or array.max() > info.max:
            raise invalid_argument(f"input {name!r} holds values outside {expected.name}'s range")
    elif expected.kind == "f" and array.dtype.kind not in "iuf":
        raise invalid_argument(f"input {name!r} must be {expected.name}, got {array.dtype.name}")
    return array.astype(expected)


class RestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive JSON front end of `RestApi`."""

    protocol_version = "HTTP/1.1"
    server: "RestServer"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._reply(413 if length > 0 else 400, {"error": "bad or too large Content-Length"})
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        status, payload = self.server.api.handle(method, self.path, body)
        self._reply(status, payload)

    def _reply(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)


class RestServer(ThreadingHTTPServer):
    """A thread per connection; daemon threads so shutdown never waits on idle keep-alives."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: RestApi):
        super().__init__(address, RestHandler)
        self.api = api
