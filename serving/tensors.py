"""TensorProto <-> numpy for the server, with every declared size checked before memory is spent.

Why not `tf.make_ndarray`: it trusts the declared shape, so a 37-byte proto declaring [500000000]
with one value is expanded to 2 GB before anything can refuse it. Here the shape is checked
against the signature and the server's limits first, the value count against the shape, and
only then is an array built (a view of `tensor_content` when the bytes are already there).
"""

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.errors import invalid_argument

# dtype enum -> (numpy dtype, TensorProto field holding values one by one).
_DTYPES = {
    types_pb2.DT_INT32: (np.dtype("<i4"), "int_val"),
    types_pb2.DT_INT64: (np.dtype("<i8"), "int64_val"),
    types_pb2.DT_FLOAT: (np.dtype("<f4"), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype("<f8"), "double_val"),
    types_pb2.DT_BOOL: (np.dtype(np.bool_), "bool_val"),
    types_pb2.DT_INT16: (np.dtype("<i2"), "int_val"),
    types_pb2.DT_INT8: (np.dtype("i1"), "int_val"),
    types_pb2.DT_UINT8: (np.dtype("u1"), "int_val"),
}
_ENUM_BY_DTYPE = {
    np.dtype(np.float32): types_pb2.DT_FLOAT,
    np.dtype(np.float64): types_pb2.DT_DOUBLE,
    np.dtype(np.int32): types_pb2.DT_INT32,
    np.dtype(np.int64): types_pb2.DT_INT64,
    np.dtype(np.bool_): types_pb2.DT_BOOL,
}
STRING_DTYPE = np.dtype(object)  # DT_STRING inputs and outputs: object arrays of bytes
DEFAULT_MAX_STRING_BYTES = 4096


@dataclass(frozen=True)
class InputSpec:
    """One input of a signature as a request must send it. `shape` holds None for a free
    dimension; `batched` says whether dimension 0 is the batch (limited by max_batch_size;
    other free dimensions by max_dim_size)."""

    signature: str
    name: str
    dtype_enum: int
    numpy_dtype: np.dtype
    shape: tuple[int | None, ...] | None  # None: any rank
    batched: bool

    def where(self) -> str:
        return f"input {self.name!r} of signature {self.signature!r}"

    def check_shape(self, dims: tuple[int, ...], max_batch_size: int, max_dim_size: int) -> None:
        """Rank, fixed sizes and limits; INVALID_ARGUMENT naming the limit otherwise."""
        if self.shape is not None and (
            len(dims) != len(self.shape)
            or any(
                want is not None and want != got for want, got in zip(self.shape, dims, strict=True)
            )
        ):
            raise invalid_argument(
                f"{self.where()} must have shape {shape_text(self.shape)}, got {shape_text(dims)}"
            )
        for axis, size in enumerate(dims):
            if size < 0:
                raise invalid_argument(f"{self.where()}: dimension {axis} is negative ({size})")
            if axis == 0 and self.batched:
                if size > max_batch_size:
                    raise invalid_argument(
                        f"{self.where()}: batch of {size} exceeds this server's limit of "
                        f"{max_batch_size} (--max-batch-size)"
                    )
            elif size > max_dim_size:
                raise invalid_argument(
                    f"{self.where()}: dimension {axis} of size {size} exceeds this server's "
                    f"limit of {max_dim_size} (--max-dim-size)"
                )


def shape_text(shape) -> str:
    if shape is None:
        return "[any rank]"
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


def dtype_name(enum: int) -> str:
    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return f"dtype enum {enum}"


def decode_tensor(
    proto: tensor_pb2.TensorProto,
    spec: InputSpec,
    max_batch_size: int,
    max_dim_size: int,
    max_string_bytes: int = DEFAULT_MAX_STRING_BYTES,
) -> np.ndarray:
    """A request's TensorProto as an array of the spec's dtype and shape, or INVALID_ARGUMENT.
    Nothing proportional to the declared shape is allocated before the shape is accepted.
    DT_STRING comes back as an object array of bytes (what Session.run takes), each element
    at most `max_string_bytes`."""
    if proto.dtype != spec.dtype_enum:
        raise invalid_argument(
            f"{spec.where()} must be {dtype_name(spec.dtype_enum)}, got {dtype_name(proto.dtype)}"
        )
    if proto.tensor_shape.unknown_rank:
        raise invalid_argument(f"{spec.where()}: the tensor's shape has unknown rank")
    dims = tuple(dim.size for dim in proto.tensor_shape.dim)
    spec.check_shape(dims, max_batch_size, max_dim_size)
    count = math.prod(dims)
    if spec.dtype_enum == types_pb2.DT_STRING:
        return _decode_strings(proto, spec, dims, count, max_string_bytes)
    known = _DTYPES.get(spec.dtype_enum)
    if known is None:  # strings and rarer types: shape already bounded, so TF may expand it
        try:
            return tf.make_ndarray(proto)
        except (ValueError, TypeError) as error:
            raise invalid_argument(f"{spec.where()}: malformed TensorProto ({error})") from None
    dtype, values_field = known
    if proto.tensor_content:
        if len(proto.tensor_content) != count * dtype.itemsize:
            raise invalid_argument(
                f"{spec.where()}: tensor_content holds {len(proto.tensor_content)} bytes, shape "
                f"{shape_text(dims)} needs {count * dtype.itemsize}"
            )
        return np.frombuffer(proto.tensor_content, dtype).reshape(dims)
    values = getattr(proto, values_field)
    given = len(values)
    if given == count:
        return np.asarray(values, dtype).reshape(dims)
    if given > count:
        raise invalid_argument(
            f"{spec.where()}: {given} values for shape {shape_text(dims)} ({count} elements)"
        )
    # TF's own parsing repeats the last value (zeros when none): the count is bounded now.
    filled = np.full(count, values[-1] if given else 0, dtype)
    filled[:given] = np.asarray(values, dtype)
    return filled.reshape(dims)


def _decode_strings(
    proto: tensor_pb2.TensorProto, spec: InputSpec, dims, count: int, max_string_bytes: int
) -> np.ndarray:
    """string_val (already in memory, bounded by the message size) -> object array of bytes;
    the element count is checked against the accepted shape before the array is built."""
    if proto.tensor_content:
        raise invalid_argument(
            f"{spec.where()}: a DT_STRING tensor sends its values in string_val, not tensor_content"
        )
    values = proto.string_val
    given = len(values)
    if given > count:
        raise invalid_argument(
            f"{spec.where()}: {given} values for shape {shape_text(dims)} ({count} elements)"
        )
    longest = max(map(len, values), default=0)
    if longest > max_string_bytes:
        raise invalid_argument(
            f"{spec.where()}: a string of {longest} bytes exceeds this server's limit of "
            f"{max_string_bytes} bytes per element (--max-string-bytes)"
        )
    array = np.empty(count, STRING_DTYPE)
    if given:
        array[:given] = list(values)
        array[given:] = values[-1]  # as TF's parsing: the last value repeated
    else:
        array[:] = b""
    return array.reshape(dims)


def check_strings(array: np.ndarray, spec: InputSpec, max_string_bytes: int) -> None:
    """Every element of an object array built elsewhere (REST) is bytes within the limit."""
    longest = 0
    for value in array.flat:
        if not isinstance(value, bytes):
            raise invalid_argument(f"{spec.where()} must hold strings, got {type(value).__name__}")
        longest = max(longest, len(value))
    if longest > max_string_bytes:
        raise invalid_argument(
            f"{spec.where()}: a string of {longest} bytes exceeds this server's limit of "
            f"{max_string_bytes} bytes per element (--max-string-bytes)"
        )


def encode_tensor(array: np.ndarray, proto: tensor_pb2.TensorProto) -> None:
    """Fill `proto` in place with what `tf.make_tensor_proto(array)` returns (dtype, shape,
    little-endian tensor_content; string_val for strings): a tenth of its cost and no
    CopyFrom, for the dtypes the signatures return; anything else goes through
    tf.make_tensor_proto."""
    if array.dtype == STRING_DTYPE or array.dtype.kind == "S":
        proto.dtype = types_pb2.DT_STRING
        dims = proto.tensor_shape.dim
        for size in array.shape:
            dims.add().size = size
        proto.string_val.extend(array.ravel().tolist())
        return
    enum = _ENUM_BY_DTYPE.get(array.dtype)
    if enum is None or array.dtype.byteorder == ">":
        proto.CopyFrom(tf.make_tensor_proto(array))
        return
    proto.dtype = enum
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add().size = size
    proto.tensor_content = array.tobytes()
