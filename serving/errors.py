"""Errors of the serving layer, each carrying the gRPC status a caller sees.

Kept free of TensorFlow so the CLI can import it cheaply.
"""

import grpc

from components.errors import MtrecError

# gRPC status -> HTTP status of TF Serving's REST API.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class RequestError(Exception):
    """A request the server refuses: `code` is the gRPC status, `message` names the problem.

    Raised anywhere below the servicers; the gRPC and REST front ends turn it into their own
    error replies, so validation is written once.
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


def invalid_argument(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message)


class ServingClientError(MtrecError):
    """A call to a model server failed (unreachable, or the request was refused).

    The message is one line naming the server and the reason; `code` keeps the gRPC status
    (None for errors found before anything was sent).
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class ServerStartError(MtrecError):
    """The server could not start (bad base path, port in use, ...)."""
