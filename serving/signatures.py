"""One loaded SavedModel version and its signatures, adapted to requests: inputs checked against
the signature and the server's limits, calls merged by the batcher, TF errors made readable,
and the version warmed up (TF Serving's warmup file when the export has one) before it serves.
"""

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2
from tensorflow.python.util import deprecation
from tensorflow_serving.apis import prediction_log_pb2

from components import features as F
from components.artifacts.model_versions import METADATA_DIR, SAVED_MODEL_FILE, WARMUP_FILE
from serving.batching import Batcher
from serving.errors import RequestError, invalid_argument
from serving.tensors import (
    DEFAULT_MAX_STRING_BYTES,
    InputSpec,
    check_strings,
    decode_tensor,
    dtype_name,
)

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = F.SIGNATURE_RETRIEVE  # "serving_default"
INIT_OP_SIGNATURE = "__saved_model_init_op"  # in the signature map, but not callable
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit
_ASSERTION = re.compile(r"assertion failed: \[(?P<message>[^\]]*)\](?P<rest>.*)", re.DOTALL)
_ASSERTED_VALUE = re.compile(r"\[x \((?P<tensor>[\w/]+):\d+\) = \] \[(?P<values>[^\]]*)\]")
_ASSERT_DATA = re.compile(r"[ ]\[(?P<values>[^\]\[]*)\]")
_NOISE = ("Graph execution error", "Detected at node", "<stack traces unavailable>")
_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


@dataclass(frozen=True)
class Limits:
    """Request size limits (ServerConfig's), the batch-size observer for metrics, and the
    TensorFlow thread settings of each version's Session."""

    max_batch_size: int = 4096
    max_dim_size: int = 4096
    batching: bool = False
    on_batch: Callable[[int], None] | None = None
    inter_op_threads: int = 1  # TensorFlow's, per loaded version (0: its default)
    intra_op_threads: int = 1  # ServerConfig's default: each call in its handler thread
    max_string_bytes: int = DEFAULT_MAX_STRING_BYTES  # per DT_STRING element
    in_flight: Callable[[], int] | None = None  # requests inside the server now (batching)


DEFAULT_LIMITS = Limits()


def describe_tf_error(error: tf.errors.OpError, input_names: Iterable[str] = ()) -> str:
    """One line from a TF runtime error: the assertion's own message (plus the offending values
    when they come from an input), else the first line that is not executor boilerplate."""
    text = error.message or str(error)
    match = _ASSERTION.search(text)
    if match:
        message = match["message"].strip().replace("\\'", "'")
        value = _ASSERTED_VALUE.search(match["rest"])
        if value and value["tensor"] in set(input_names):
            message += f" (got {value['values'].strip()})"
        elif data := _ASSERT_DATA.match(match["rest"]):  # tf.debugging.Assert's data: the
            message += f" [{data['values'].strip()}]"  # offending values the graph selected
        return message
    for line in text.splitlines():
        line = line.split("\t [[", 1)[0].split(" [[", 1)[0].strip()
        if line and not line.startswith(_NOISE):
            return line
    return type(error).__name__


def _status(error: tf.errors.OpError) -> grpc.StatusCode:
    """TF's error codes are gRPC's; a kernel failing on a request's values is the request's
    fault, never INTERNAL."""
    status = _STATUS_BY_VALUE.get(error.error_code, grpc.StatusCode.INVALID_ARGUMENT)
    if status in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return grpc.StatusCode.INVALID_ARGUMENT
    return status


class Signature:
    """One callable signature of a loaded version, with what validation needs looked up once
    (an InputSpec per input, from the SignatureDef), so a request costs dictionary look-ups,
    not introspection. `call` runs the SignatureDef's tensors by name in the version's Session,
    as TF Serving does: numpy in, numpy out, no eager tensors in between."""

    def __init__(
        self,
        name: str,
        signature_def: meta_graph_pb2.SignatureDef,
        session_call: Callable[[list[str], list[str]], Callable],
        limits: Limits = DEFAULT_LIMITS,
    ):
        self.name = name
        self.signature_def = signature_def
        self.limits = limits
        shapes = {n: _shape(info) for n, info in signature_def.inputs.items()}
        # Batched: every non-scalar input has a free first dimension, and their sizes must
        # agree (a mismatch would silently broadcast inside the model). Scalar inputs (`k`)
        # are per request.
        arrays = [shape for shape in shapes.values() if shape is None or len(shape) >= 1]
        self.batched = bool(arrays) and all(shape and shape[0] is None for shape in arrays)
        self.inputs: dict[str, InputSpec] = {
            n: InputSpec(
                name,
                n,
                info.dtype,
                _numpy_dtype(info.dtype),
                shapes[n],
                self.batched and bool(shapes[n]),
            )
            for n, info in sorted(signature_def.inputs.items())
        }
        self.input_names = frozenset(self.inputs)
        self.output_names = tuple(sorted(signature_def.outputs))
        self._feed_order = tuple(self.inputs)
        self._callable = session_call(
            [signature_def.inputs[n].name for n in self._feed_order],
            [signature_def.outputs[n].name for n in self.output_names],
        )
        mergeable = self.batched and len(arrays) == len(shapes)
        self._batcher = (
            Batcher(self.call, limits.max_batch_size, limits.on_batch, limits.in_flight)
            if limits.batching and mergeable
            else None
        )

    def _unknown_inputs(self, names: Iterable[str]) -> RequestError:
        return invalid_argument(
            f"signature {self.name!r} has no input named {', '.join(map(repr, sorted(names)))}; "
            f"its inputs are {', '.join(sorted(self.inputs))}"
        )

    def _check_names(self, names) -> None:
        if names != self.input_names:
            missing = self.input_names - names
            if missing:
                raise invalid_argument(
                    f"signature {self.name!r} needs input {', '.join(sorted(missing))} "
                    f"(its inputs are {', '.join(sorted(self.inputs))})"
                )
            raise self._unknown_inputs(names - self.input_names)

    def decode(self, protos: Mapping) -> dict[str, np.ndarray]:
        """TensorProtos (a Predict request's inputs) -> arrays, every size checked first."""
        for name in protos:
            if name not in self.inputs:
                raise self._unknown_inputs([name])
        self._check_names(protos.keys())
        limits = self.limits
        arrays = {
            name: decode_tensor(
                proto,
                self.inputs[name],
                limits.max_batch_size,
                limits.max_dim_size,
                limits.max_string_bytes,
            )
            for name, proto in protos.items()
        }
        self._check_batch(arrays)
        return arrays

    def validate(self, arrays: dict[str, np.ndarray]) -> None:
        """Arrays built elsewhere (REST's JSON): names, dtypes, shapes, limits, batch sizes."""
        self._check_names(arrays.keys())
        limits = self.limits
        for name, array in arrays.items():
            spec = self.inputs[name]
            if array.dtype != spec.numpy_dtype:
                raise invalid_argument(
                    f"{spec.where()} must be {dtype_name(spec.dtype_enum)}, got {array.dtype.name}"
                )
            spec.check_shape(array.shape, limits.max_batch_size, limits.max_dim_size)
            if spec.dtype_enum == types_pb2.DT_STRING:
                check_strings(array, spec, limits.max_string_bytes)
        self._check_batch(arrays)

    def _check_batch(self, arrays: dict[str, np.ndarray]) -> None:
        if not self.batched:
            return
        first = None
        for name, array in arrays.items():
            if array.ndim == 0:
                continue
            if first is None:
                first = (name, array.shape[0])
            elif array.shape[0] != first[1]:
                raise invalid_argument(
                    f"inputs of signature {self.name!r} must have the same batch size (first "
                    f"dimension): {first[0]} has {first[1]}, {name} has {array.shape[0]}"
                )

    def run(
        self, arrays: dict[str, np.ndarray], output_filter: Iterable[str] = ()
    ) -> dict[str, np.ndarray]:
        """Call checked arrays (merged with concurrent requests when batching is on)."""
        wanted = self.output_names
        if output_filter:
            wanted = tuple(output_filter)
            unknown = [n for n in wanted if n not in self.output_names]
            if unknown:
                raise invalid_argument(
                    f"output_filter names {', '.join(unknown)}, not outputs of signature "
                    f"{self.name!r} ({', '.join(self.output_names)})"
                )
        if self._batcher is not None:
            outputs = self._batcher.run(arrays)
        else:
            if self.limits.on_batch is not None and self.batched:
                self.limits.on_batch(next(a for a in arrays.values() if a.ndim).shape[0])
            outputs = self.call(arrays)
        return {n: outputs[n] for n in wanted}

    def call(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The signature run with the checked arrays; TF errors become RequestErrors."""
        try:
            outputs = self._callable(*[arrays[n] for n in self._feed_order])
        except tf.errors.OpError as error:
            raise RequestError(_status(error), describe_tf_error(error, self.inputs)) from None
        return dict(zip(self.output_names, outputs, strict=True))

    def sample(self) -> dict[str, np.ndarray]:
        """A valid-looking request: free dimensions 1, numbers 1, strings "1"."""
        arrays = {}
        for name, spec in self.inputs.items():
            dims = [1 if dim is None else dim for dim in spec.shape or (1,)]
            dtype = spec.numpy_dtype
            arrays[name] = np.full(dims, b"1" if dtype.kind in "SOU" else 1, dtype=dtype)
        return arrays

    def warm_up(self) -> None:
        """One call with `sample()`: the first call of a signature traces and initialises
        kernels, and must not land on a client."""
        self.run(self.sample())


def _make_callable(session, feeds: list[str], fetches: list[str]):
    """Session.run pre-pruned to these tensors, ops run in the calling thread."""
    options = config_pb2.CallableOptions(feed=feeds, fetch=fetches)
    options.run_options.inter_op_thread_pool = -1
    return session._make_callable_from_options(options)


def _shape(info: meta_graph_pb2.TensorInfo) -> tuple[int | None, ...] | None:
    """A SignatureDef input's shape, None for a free dimension; None for an unknown rank."""
    if info.tensor_shape.unknown_rank:
        return None
    return tuple(None if dim.size < 0 else dim.size for dim in info.tensor_shape.dim)


def _numpy_dtype(enum: int) -> np.dtype:
    """What a decoded input of this dtype holds (strings: an object array of bytes, as
    Session.run takes them)."""
    if enum == types_pb2.DT_STRING:
        return np.dtype(object)
    return np.dtype(tf.dtypes.as_dtype(enum).as_numpy_dtype)


def read_signature_defs(path: str) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDefs of the serving MetaGraph, as TF Serving reports them in metadata."""
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(path, SAVED_MODEL_FILE), "rb") as handle:
        saved_model.ParseFromString(handle.read())
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags or len(saved_model.meta_graphs) == 1:
            return {
                name: sig
                for name, sig in meta_graph.signature_def.items()
                if name != INIT_OP_SIGNATURE
            }
    return {}


def warmup_path(version_dir: str) -> str:
    return os.path.join(version_dir, METADATA_DIR, WARMUP_FILE)


class LoadedVersion:
    """One version in memory: its signatures, ready to call (warmed up before it is returned).

    Loaded as TF Serving loads it: a TF1 Session over its own graph, tag `serve`, the
    SignatureDefs' tensors run by name through one pre-pruned callable per signature. Ops run
    in the calling thread (no hand-off to TensorFlow's inter-op pool): for these small graphs
    that halves a call (retrieve ~0.28 -> ~0.13 ms against the eager concrete function)."""

    def __init__(
        self,
        model_name: str,
        version: int,
        path: str,
        limits: Limits = DEFAULT_LIMITS,
        warm_up: bool = True,
    ):
        started = time.perf_counter()
        self.model_name = model_name
        self.version = version
        self.path = path
        self.signature_defs = read_signature_defs(path)
        graph = tf.Graph()
        config = tf.compat.v1.ConfigProto(
            inter_op_parallelism_threads=limits.inter_op_threads,
            intra_op_parallelism_threads=limits.intra_op_threads,
        )
        # Kept alive by the callables (and so by any request still using this version); the
        # session closes when the last of them goes.
        session = tf.compat.v1.Session(graph=graph, config=config)
        with graph.as_default(), deprecation.silence():
            tf.compat.v1.saved_model.loader.load(session, [tf.saved_model.SERVING], path)
        session_call = functools.partial(_make_callable, session)
        self.signatures = {
            name: Signature(name, signature_def, session_call, limits)
            for name, signature_def in sorted(self.signature_defs.items())
        }
        if not self.signatures:
            raise ValueError(f"{path}: the SavedModel has no serving signatures")
        self.warmup_records = 0
        if warm_up:
            if os.path.isfile(warmup_path(path)):
                self.warmup_records = self._replay_warmup(warmup_path(path))
            else:
                self._warm_up_each_signature()
        self.load_seconds = time.perf_counter() - started

    def _warm_up_each_signature(self) -> None:
        """Without a warmup file: each signature once with made-up inputs. The model refusing
        their values (INVALID_ARGUMENT: say "1" is not a known id) still ran the graph up to
        its checks; any other failure fails the load."""
        for signature in self.signatures.values():
            try:
                signature.warm_up()
            except RequestError as error:
                if error.code == grpc.StatusCode.INVALID_ARGUMENT:
                    log.info("warm-up of %s: %s", signature.name, error.message)
                    continue
                raise ValueError(
                    f"warm-up call of signature {signature.name!r} failed: {error.message}"
                ) from None

    def _replay_warmup(self, path: str) -> int:
        """TF Serving's warmup: each PredictionLog's request, in order (at most 1000); any
        failure fails the load, as there."""
        count = 0
        for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            kind = entry.WhichOneof("log_type")
            if kind != "predict_log":
                raise ValueError(f"{path}: record {count} is a {kind}; only predict_log is served")
            request = entry.predict_log.request
            try:
                signature = self.signature(request.model_spec.signature_name)
                signature.run(signature.decode(request.inputs), request.output_filter)
            except RequestError as error:
                raise ValueError(f"{path}: warmup record {count} failed: {error.message}") from None
            count += 1
        return count

    def signature(self, name: str) -> Signature:
        found = self.signatures.get(name or DEFAULT_SIGNATURE)
        if found is None:
            raise invalid_argument(
                f"signature {name!r} not found in model {self.model_name!r} version {self.version}; "
                f"it has {', '.join(sorted(self.signatures))}"
            )
        return found
