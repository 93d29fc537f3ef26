"""Loaded SavedModel versions and the manager that finds, loads, warms up and swaps them.

The manager watches `<base>/<model_name>/<integer version>/` like TF Serving's "latest" policy:
the highest version that loads is served; a version that fails to load is logged and skipped
(the previous one keeps serving) and retried only when its files change. Requests read an
immutable snapshot of the loaded versions, so a swap never blocks or tears a request.
"""

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2

from components import features as F
from components.layout import SAVED_MODEL_FILE, list_versions
from serving.batching import Batcher
from serving.errors import RequestError, invalid_argument, not_found

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = F.SIGNATURE_RETRIEVE  # "serving_default"
INIT_OP_SIGNATURE = "__saved_model_init_op"  # in the signature map, but not callable
_ASSERTION = re.compile(r"assertion failed: \[(?P<message>[^\]]*)\](?P<rest>.*)", re.DOTALL)
_ASSERTED_VALUE = re.compile(r"\[x \((?P<tensor>[\w/]+):\d+\) = \] \[(?P<values>[^\]]*)\]")
_NOISE = ("Graph execution error", "Detected at node", "<stack traces unavailable>")


def describe_tf_error(error: tf.errors.OpError, input_names: Iterable[str] = ()) -> str:
    """One line from a TF runtime error: the assertion's own message (plus the offending values
    when they come from an input), else the first line that is not executor boilerplate."""
    text = error.message or str(error)
    match = _ASSERTION.search(text)
    if match:
        message = match["message"].strip()
        value = _ASSERTED_VALUE.search(match["rest"])
        if value and value["tensor"] in set(input_names):
            message += f" (got {value['values'].strip()})"
        return message
    for line in text.splitlines():
        line = line.split("\t [[", 1)[0].split(" [[", 1)[0].strip()
        if line and not line.startswith(_NOISE):
            return line
    return type(error).__name__


_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


def _status(error: tf.errors.OpError) -> grpc.StatusCode:
    """TF's error codes are gRPC's."""
    return _STATUS_BY_VALUE.get(error.error_code, grpc.StatusCode.INTERNAL)


def _dtype_name(enum: int) -> str:
    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return f"dtype enum {enum}"


def _shape_text(shape: Iterable[int | None]) -> str:
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


class Signature:
    """One callable signature of a loaded version, with what validation needs looked up once
    (names, dtype enums, shapes), so a request costs dictionary look-ups, not introspection."""

    def __init__(
        self,
        name: str,
        function,
        signature_def: meta_graph_pb2.SignatureDef | None,
        max_batch_size: int = 0,
        batching: bool = False,
    ):
        self.name = name
        self.function = function
        self.signature_def = signature_def
        self.max_batch_size = max_batch_size
        _, specs = function.structured_input_signature
        self.inputs: dict[str, tf.TensorSpec] = dict(specs)
        self.input_names = frozenset(self.inputs)
        self.dtype_enums = {n: s.dtype.as_datatype_enum for n, s in self.inputs.items()}
        self.numpy_dtypes = {n: np.dtype(s.dtype.as_numpy_dtype) for n, s in self.inputs.items()}
        self.shapes = {n: tuple(s.shape.as_list()) for n, s in self.inputs.items()}
        self.output_names = tuple(function.structured_outputs)
        # Every input batched along a free first dimension: sizes must agree (TF Serving's row
        # format assumes it; a mismatch here silently broadcasts inside the model).
        self.batched = bool(self.inputs) and all(
            len(shape) >= 1 and shape[0] is None for shape in self.shapes.values()
        )
        self._batcher = Batcher(self.call, max_batch_size) if batching and self.batched else None

    def _where(self, name: str) -> str:
        return f"input {name!r} of signature {self.name!r}"

    def check_dtype_enum(self, name: str, dtype_enum: int) -> None:
        """Refuse an input by name and proto dtype before decoding it (cheap, exact message)."""
        expected = self.dtype_enums.get(name)
        if expected is None:
            raise self._unknown_inputs([name])
        if dtype_enum != expected:
            raise invalid_argument(
                f"{self._where(name)} must be {_dtype_name(expected)}, got {_dtype_name(dtype_enum)}"
            )

    def _unknown_inputs(self, names: Iterable[str]) -> RequestError:
        return invalid_argument(
            f"signature {self.name!r} has no input named {', '.join(map(repr, sorted(names)))}; "
            f"its inputs are {', '.join(sorted(self.inputs))}"
        )

    def validate(self, arrays: dict[str, np.ndarray]) -> None:
        """Names, dtypes, shapes and batch sizes, each refused with a message naming the input:
        a malformed tensor must never reach the kernels (a scalar id aborts the process in
        TF's RaggedGather, for one)."""
        if arrays.keys() != self.input_names:
            missing = self.input_names - arrays.keys()
            if missing:
                raise invalid_argument(
                    f"signature {self.name!r} needs input {', '.join(sorted(missing))} "
                    f"(its inputs are {', '.join(sorted(self.inputs))})"
                )
            raise self._unknown_inputs(arrays.keys() - self.input_names)
        batch = None
        for name, array in arrays.items():
            expected = self.numpy_dtypes[name]
            if array.dtype != expected:
                raise invalid_argument(
                    f"{self._where(name)} must be {tf.as_dtype(expected).name}, got {array.dtype.name}"
                )
            shape = self.shapes[name]
            if array.ndim != len(shape) or any(
                want is not None and want != got
                for want, got in zip(shape, array.shape, strict=True)
            ):
                raise invalid_argument(
                    f"{self._where(name)} must have shape {_shape_text(shape)}, "
                    f"got {_shape_text(array.shape)}"
                )
            if self.batched:
                if batch is None:
                    batch = (name, array.shape[0])
                elif array.shape[0] != batch[1]:
                    raise invalid_argument(
                        f"inputs of signature {self.name!r} must have the same batch size (first "
                        f"dimension): {batch[0]} has {batch[1]}, {name} has {array.shape[0]}"
                    )
        if self.batched and self.max_batch_size and batch[1] > self.max_batch_size:
            raise invalid_argument(
                f"batch of {batch[1]} exceeds this server's limit of {self.max_batch_size} "
                "(--max-batch-size)"
            )

    def run(
        self, arrays: dict[str, np.ndarray], output_filter: Iterable[str] = ()
    ) -> dict[str, np.ndarray]:
        """Validate, then call (merged with concurrent requests when batching is on)."""
        self.validate(arrays)
        wanted = self.output_names
        if output_filter:
            wanted = tuple(output_filter)
            unknown = [n for n in wanted if n not in self.output_names]
            if unknown:
                raise invalid_argument(
                    f"output_filter names {', '.join(unknown)}, not outputs of signature "
                    f"{self.name!r} ({', '.join(self.output_names)})"
                )
        outputs = self._batcher.run(arrays) if self._batcher else self.call(arrays)
        return {n: outputs[n] for n in wanted}

    def call(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The signature called with keyword tensors; TF errors become RequestErrors."""
        try:
            outputs = self.function(**{n: tf.constant(a) for n, a in arrays.items()})
        except tf.errors.OpError as error:
            raise RequestError(_status(error), describe_tf_error(error, self.inputs)) from None
        return {n: t.numpy() for n, t in outputs.items()}

    def warm_up(self) -> None:
        """One call with a batch of 1 (free dimensions 1, ids 1): the first call of a
        signature traces and initialises kernels, and must not land on a client."""
        arrays = {}
        for name, shape in self.shapes.items():
            dims = [1 if dim is None else dim for dim in shape]
            dtype = self.numpy_dtypes[name]
            arrays[name] = np.full(dims, b"" if dtype.kind in "SOU" else 1, dtype=dtype)
        self.run(arrays)


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


class LoadedVersion:
    """One version in memory: its signatures, ready to call."""

    def __init__(
        self,
        model_name: str,
        version: int,
        path: str,
        max_batch_size: int = 0,
        warm_up: bool = True,
        batching: bool = False,
    ):
        started = time.perf_counter()
        self.model_name = model_name
        self.version = version
        self.path = path
        self.signature_defs = read_signature_defs(path)
        # Keep the loaded object alive: the signature functions hold only weak references to it.
        self._saved_model = tf.saved_model.load(path)
        self.signatures = {
            name: Signature(name, function, self.signature_defs.get(name), max_batch_size, batching)
            for name, function in self._saved_model.signatures.items()
            if name != INIT_OP_SIGNATURE
        }
        if not self.signatures:
            raise ValueError(f"{path}: the SavedModel has no serving signatures")
        if warm_up:
            for signature in self.signatures.values():
                try:
                    signature.warm_up()
                except RequestError as error:
                    raise ValueError(
                        f"warm-up call of signature {signature.name!r} failed: {error.message}"
                    ) from None
        self.load_seconds = time.perf_counter() - started

    def signature(self, name: str) -> Signature:
        found = self.signatures.get(name or DEFAULT_SIGNATURE)
        if found is None:
            raise invalid_argument(
                f"signature {name!r} not found in model {self.model_name!r} version {self.version}; "
                f"it has {', '.join(sorted(self.signatures))}"
            )
        return found


class VersionState(NamedTuple):
    """A version as GetModelStatus reports it (`state` is a ModelVersionStatus.State name)."""

    version: int
    state: str  # AVAILABLE, LOADING or END (failed to load)
    error: str = ""  # why it failed; empty otherwise


@dataclass(frozen=True)
class _Snapshot:
    """What requests see; replaced as a whole, never mutated."""

    loaded: dict[int, LoadedVersion] = field(default_factory=dict)
    latest: LoadedVersion | None = None


class ModelManager:
    """Finds versions under `<base>/<name>/`, loads and warms up new ones before switching to
    them, keeps the newest `keep_versions` loaded for pinned requests, and never drops the
    version it serves for one that fails to load."""

    def __init__(
        self,
        base_path: str,
        model_name: str,
        keep_versions: int = 1,
        max_batch_size: int = 0,
        warm_up: bool = True,
        batching: bool = False,
    ):
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        self.base_path = base_path
        self.model_name = model_name
        self.model_dir = os.path.join(base_path, model_name)
        self.keep_versions = keep_versions
        self.max_batch_size = max_batch_size
        self.warm_up = warm_up
        self.batching = batching
        self._snapshot = _Snapshot()
        self._failed: dict[int, tuple[tuple, str]] = {}  # version -> (files fingerprint, error)
        self._loading: int | None = None
        self._poll_lock = threading.Lock()
        self._listeners: list[Callable[[LoadedVersion], None]] = []
        self._warned_empty = False

    # --- what requests use ---

    @property
    def latest(self) -> LoadedVersion | None:
        return self._snapshot.latest

    def resolve(self, name: str, version: int | None = None, label: str = "") -> LoadedVersion:
        """The loaded version a request names; NOT_FOUND / INVALID_ARGUMENT / UNAVAILABLE with
        the reason otherwise."""
        snapshot = self._snapshot
        if name != self.model_name:
            if not name:
                raise invalid_argument("model_spec.name is required")
            raise not_found(
                f"model {name!r} is not served here (this server serves {self.model_name!r})"
            )
        if label:
            raise invalid_argument(
                f"version labels are not configured on this server (got {label!r}): "
                "pin model_spec.version or leave it unset for the latest"
            )
        if snapshot.latest is None:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"no version of model {name!r} is loaded yet (watching {self.model_dir})",
            )
        if version is None:
            return snapshot.latest
        found = snapshot.loaded.get(version)
        if found is None:
            raise not_found(
                f"version {version} of model {name!r} is not loaded "
                f"(loaded: {', '.join(map(str, sorted(snapshot.loaded)))})"
            )
        return found

    def states(self, name: str, version: int | None = None) -> list[VersionState]:
        """Loaded versions as AVAILABLE, one being loaded as LOADING, failed ones as END with
        their error; NOT_FOUND when there is nothing to report."""
        if name != self.model_name:
            raise not_found(
                f"model {name!r} is not served here (this server serves {self.model_name!r})"
            )
        snapshot, loading = self._snapshot, self._loading
        states = {v: VersionState(v, "AVAILABLE") for v in snapshot.loaded}
        for v, (_, error) in list(self._failed.items()):
            states.setdefault(v, VersionState(v, "END", error))
        if loading is not None:
            states.setdefault(loading, VersionState(loading, "LOADING"))
        if version is not None:
            if version not in states:
                raise not_found(f"version {version} of model {name!r} is not loaded")
            return [states[version]]
        if not states:
            raise not_found(f"no version of model {name!r} found under {self.model_dir}")
        return [states[v] for v in sorted(states)]

    def add_listener(self, listener: Callable[[LoadedVersion], None]) -> None:
        """Called with the newly served version after each switch (e.g. to flip health)."""
        self._listeners.append(listener)

    # --- loading ---

    def poll(self) -> bool:
        """One pass over the model folder; returns True when the served version set changed."""
        with self._poll_lock:
            return self._poll()

    def _poll(self) -> bool:
        on_disk = list_versions(self.model_dir)
        for version in [v for v in self._failed if v not in on_disk]:
            del self._failed[version]
        current = self._snapshot
        if not on_disk:
            if not self._warned_empty:
                what = (
                    f"still serving version {current.latest.version}"
                    if current.latest
                    else "waiting"
                )
                log.warning("no model versions under %s: %s", self.model_dir, what)
                self._warned_empty = True
            return False
        self._warned_empty = False
        target = None
        for version in reversed(on_disk):
            target = current.loaded.get(version) or self._load(version)
            if target is not None:
                break
        if target is None:
            return False
        older = sorted(
            (v for v in current.loaded if v < target.version and v in on_disk), reverse=True
        )[: self.keep_versions - 1]
        loaded = {target.version: target, **{v: current.loaded[v] for v in older}}
        if loaded.keys() == current.loaded.keys() and target is current.latest:
            return False
        self._snapshot = _Snapshot(loaded, target)
        dropped = sorted(set(current.loaded) - set(loaded))
        if target is not current.latest:
            previous = current.latest.version if current.latest else None
            log.info(
                "serving %s version %d (was %s)",
                self.model_name,
                target.version,
                previous if previous is not None else "none",
            )
            for listener in self._listeners:
                listener(target)
        if dropped:
            log.info("unloaded %s versions %s", self.model_name, dropped)
        return True

    def _load(self, version: int) -> LoadedVersion | None:
        """Load and warm up one version; None (logged, remembered) when it fails."""
        path = os.path.join(self.model_dir, str(version))
        fingerprint = _fingerprint(path)
        failed = self._failed.get(version)
        if failed is not None and failed[0] == fingerprint:
            return None  # unchanged since it failed: do not retry every poll
        log.info("loading %s version %d from %s", self.model_name, version, path)
        self._loading = version
        try:
            loaded = LoadedVersion(
                self.model_name,
                version,
                path,
                self.max_batch_size,
                warm_up=self.warm_up,
                batching=self.batching,
            )
        except Exception as error:  # any load failure must leave the served version in place
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            serving = self._snapshot.latest
            log.error(
                "could not load %s version %d (%s); %s",
                self.model_name,
                version,
                message,
                f"still serving version {serving.version}" if serving else "nothing is served yet",
            )
            self._failed[version] = (fingerprint, message)
            return None
        finally:
            self._loading = None
        self._failed.pop(version, None)
        log.info(
            "loaded %s version %d in %.1fs (signatures: %s)",
            self.model_name,
            version,
            loaded.load_seconds,
            ", ".join(sorted(loaded.signatures)),
        )
        return loaded

    def watch(self, interval: float, stop: threading.Event) -> None:
        """Poll every `interval` seconds until `stop` is set (run in a thread)."""
        while not stop.wait(interval):
            try:
                self.poll()
            except Exception:  # a polling bug must not end polling
                log.exception("polling %s failed", self.model_dir)


def _fingerprint(path: str) -> tuple:
    """Names, sizes and mtimes of a version's files: a failed version is retried when it changes."""
    entries = []
    for folder in (path, os.path.join(path, "variables")):
        try:
            with os.scandir(folder) as scan:
                for entry in scan:
                    if entry.is_file():
                        stat = entry.stat()
                        entries.append((entry.path, stat.st_size, stat.st_mtime_ns))
        except OSError:
            continue
    return tuple(sorted(entries))
