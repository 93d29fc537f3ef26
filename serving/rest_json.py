"""TF Serving's REST JSON formats: request bodies (row `instances` or columnar `inputs`) decoded
into arrays of each signature input's declared dtype, and arrays encoded back as JSON values
(strings as text, `{"b64": ...}` for bytes, bools as true/false).
"""

import base64
import binascii
import json
from typing import Any

import numpy as np
from tensorflow.core.framework import types_pb2

from serving.errors import invalid_argument
from serving.signatures import Signature


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid_argument(f"the request body is not valid JSON ({error})") from None
    except RecursionError:
        raise invalid_argument("the request body nests too deeply") from None


def columns_from_instances(signature: Signature, instances: Any) -> dict[str, Any]:
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
        columns = {name: [row[name] for row in instances] for name in names}
        for name, spec in signature.inputs.items():  # a per-request scalar (k) is not a row
            if name in columns and spec.shape == ():
                values = columns[name]
                if any(v != values[0] for v in values):
                    raise invalid_argument(f"input {name!r} is one value per request")
                columns[name] = values[0]
        return columns
    if len(signature.inputs) != 1:
        raise invalid_argument(
            f"signature {signature.name!r} has inputs {', '.join(sorted(signature.inputs))}: "
            "each instance must be an object naming them"
        )
    return {next(iter(signature.inputs)): instances}


def columns_from_inputs(signature: Signature, inputs: Any) -> dict[str, Any]:
    """Columnar format: an object of named inputs, or one bare value for a one-input signature."""
    if isinstance(inputs, dict):
        return inputs
    if len(signature.inputs) != 1:
        raise invalid_argument(
            f'signature {signature.name!r} has several inputs: "inputs" must be an object naming '
            f"{', '.join(sorted(signature.inputs))}"
        )
    return {next(iter(signature.inputs)): inputs}


def to_array(signature: Signature, name: str, value: Any) -> np.ndarray:
    """JSON values -> an array of the signature's dtype; no silent rounding or wrapping.
    String inputs take JSON strings (sent as UTF-8) or TF Serving's {"b64": "..."}."""
    spec = signature.inputs.get(name)
    if spec is None:
        raise invalid_argument(
            f"signature {signature.name!r} has no input named {name!r}; "
            f"its inputs are {', '.join(sorted(signature.inputs))}"
        )
    expected = spec.numpy_dtype
    if spec.dtype_enum == types_pb2.DT_STRING:
        return _to_strings(signature, name, value)
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):
        array = None
    if array is None or array.dtype == object:
        raise invalid_argument(f"input {name!r} is not a rectangular array of numbers")
    if array.size == 0:
        return array.astype(expected)
    if expected.kind in "iu":
        if array.dtype.kind not in "iu":
            raise invalid_argument(
                f"input {name!r} of signature {signature.name!r} must be {expected.name}, "
                f"got {_json_kind(array)} values"
            )
        info = np.iinfo(expected)
        if array.min() < info.min or array.max() > info.max:
            raise invalid_argument(f"input {name!r} holds values outside {expected.name}'s range")
    elif expected.kind == "f" and array.dtype.kind not in "iuf":
        raise invalid_argument(f"input {name!r} must be {expected.name}, got {_json_kind(array)}")
    elif expected.kind == "b" and array.dtype.kind != "b":
        raise invalid_argument(f"input {name!r} must be true/false, got {_json_kind(array)}")
    return array.astype(expected)


def _json_kind(array: np.ndarray) -> str:
    return "string" if array.dtype.kind in "US" else array.dtype.name


def _to_strings(signature: Signature, name: str, value: Any) -> np.ndarray:
    """JSON strings (or {"b64": ...}) -> an object array of bytes, rectangular."""
    try:
        array = np.asarray(value, dtype=object)
    except ValueError:
        array = None
    if array is None:
        raise invalid_argument(f"input {name!r} is not a rectangular array of strings")
    flat = array.reshape(-1)
    for index, item in enumerate(flat):
        if isinstance(item, str):
            flat[index] = item.encode("utf-8")
        elif isinstance(item, dict) and set(item) == {"b64"} and isinstance(item["b64"], str):
            try:
                flat[index] = base64.b64decode(item["b64"], validate=True)
            except binascii.Error:
                raise invalid_argument(
                    f'input {name!r}: invalid base64 in {{"b64": ...}}'
                ) from None
        else:
            raise invalid_argument(
                f"input {name!r} of signature {signature.name!r} must be string, got "
                f'{type(item).__name__} values (JSON strings, or {{"b64": ...}} for bytes)'
            )
    return array


def json_value(array: np.ndarray):
    """An output as JSON: bytes as UTF-8 text, or TF Serving's {"b64": ...} when not text."""
    if array.dtype != object and array.dtype.kind != "S":
        return array.tolist()

    def text(item):
        if isinstance(item, bytes):
            try:
                return item.decode("utf-8")
            except UnicodeDecodeError:
                return {"b64": base64.b64encode(item).decode("ascii")}
        return item

    return np.vectorize(text, otypes=[object])(array).tolist() if array.size else array.tolist()


def json_bytes(payload: Any) -> bytes:
    return json.dumps(payload).encode("utf-8")
