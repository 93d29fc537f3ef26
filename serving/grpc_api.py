"""The TF Serving gRPC API (PredictionService, ModelService) over a `ModelManager`.

Only the standard protos and stubs of `tensorflow-serving-api`: any TF Serving client works
against this server, and this project's client works against TF Serving.
"""

import logging

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.errors import RequestError, invalid_argument
from serving.models import LoadedVersion, ModelManager, Signature

log = logging.getLogger(__name__)

SIGNATURE_DEF_FIELD = "signature_def"
_STATES = get_model_status_pb2.ModelVersionStatus.State
_UNKNOWN_ERROR = 2  # tensorflow.error.Code.UNKNOWN


# Numeric dtypes encoded directly (tensor_content, as tf.make_tensor_proto writes them).
_CONTENT_DTYPES = {
    np.dtype(np.float32): types_pb2.DT_FLOAT,
    np.dtype(np.float64): types_pb2.DT_DOUBLE,
    np.dtype(np.int32): types_pb2.DT_INT32,
    np.dtype(np.int64): types_pb2.DT_INT64,
}


def encode_tensor(array: np.ndarray, proto: tensor_pb2.TensorProto) -> None:
    """Fill `proto` in place with what `tf.make_tensor_proto(array)` returns (dtype, shape,
    little-endian tensor_content): a tenth of its cost and no CopyFrom, for the dtypes the
    signatures return; anything else goes through tf.make_tensor_proto."""
    enum = _CONTENT_DTYPES.get(array.dtype)
    if enum is None or array.dtype.byteorder == ">":
        proto.CopyFrom(tf.make_tensor_proto(array))
        return
    proto.dtype = enum
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add().size = size
    proto.tensor_content = array.tobytes()


def _requested_version(spec) -> int | None:
    return spec.version.value if spec.HasField("version") else None


def decode_inputs(signature: Signature, inputs) -> dict[str, np.ndarray]:
    """TensorProtos -> numpy, refusing an unknown name or a wrong dtype before decoding."""
    arrays = {}
    for name, proto in inputs.items():
        signature.check_dtype_enum(name, proto.dtype)
        try:
            arrays[name] = tf.make_ndarray(proto)
        except (ValueError, TypeError) as error:
            raise invalid_argument(f"input {name!r}: malformed TensorProto ({error})") from None
    return arrays


def _abort_with(context: grpc.ServicerContext, error: Exception, method: str) -> None:
    """Turn an error into the call's status (context.abort raises, ending the call)."""
    if isinstance(error, RequestError):
        context.abort(error.code, error.message)
    log.error("%s failed", method, exc_info=error)
    context.abort(
        grpc.StatusCode.INTERNAL, f"{method}: internal error ({type(error).__name__}: {error})"
    )


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict on any signature (serving_default when none is named) and GetModelMetadata."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        try:
            spec = request.model_spec
            loaded = self.manager.resolve(spec.name, _requested_version(spec), spec.version_label)
            signature = loaded.signature(spec.signature_name)
            outputs = signature.run(decode_inputs(signature, request.inputs), request.output_filter)
        except Exception as error:
            _abort_with(context, error, "Predict")
        response = predict_pb2.PredictResponse()
        self._fill_spec(response.model_spec, loaded, signature.name)
        for name, array in outputs.items():
            encode_tensor(array, response.outputs[name])
        return response

    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        try:
            spec = request.model_spec
            loaded = self.manager.resolve(spec.name, _requested_version(spec), spec.version_label)
            fields = list(request.metadata_field)
            if not fields:
                raise invalid_argument(f"metadata_field is empty: ask for {SIGNATURE_DEF_FIELD!r}")
            unsupported = [f for f in fields if f != SIGNATURE_DEF_FIELD]
            if unsupported:
                raise invalid_argument(
                    f"metadata field {', '.join(map(repr, unsupported))} is not supported "
                    f"(only {SIGNATURE_DEF_FIELD!r})"
                )
        except Exception as error:
            _abort_with(context, error, "GetModelMetadata")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        self._fill_spec(response.model_spec, loaded)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in loaded.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature_def)
        packed = any_pb2.Any()
        packed.Pack(signature_map)
        response.metadata[SIGNATURE_DEF_FIELD].CopyFrom(packed)
        return response

    @staticmethod
    def _fill_spec(spec, loaded: LoadedVersion, signature_name: str = "") -> None:
        spec.name = loaded.model_name
        spec.version.value = loaded.version
        if signature_name:
            spec.signature_name = signature_name

    def _unimplemented(self, context, method: str) -> None:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not implemented by this server: use Predict (signatures "
            f"{', '.join(sorted(self.manager.latest.signatures)) if self.manager.latest else '-'})",
        )

    def Classify(self, request, context):
        self._unimplemented(context, "Classify")

    def Regress(self, request, context):
        self._unimplemented(context, "Regress")

    def MultiInference(self, request, context):
        self._unimplemented(context, "MultiInference")


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus: loaded versions AVAILABLE, a failed one END with its error."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context
    ) -> get_model_status_pb2.GetModelStatusResponse:
        try:
            spec = request.model_spec
            if spec.version_label:
                raise invalid_argument("version labels are not configured on this server")
            states = self.manager.states(spec.name, _requested_version(spec))
        except Exception as error:
            _abort_with(context, error, "GetModelStatus")
        response = get_model_status_pb2.GetModelStatusResponse()
        for state in states:
            entry = response.model_version_status.add()
            entry.version = state.version
            entry.state = _STATES.Value(state.state)
            if state.error:
                entry.status.error_code = _UNKNOWN_ERROR
                entry.status.error_message = state.error
        return response

    def HandleReloadConfigRequest(self, request, context):
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "HandleReloadConfigRequest is not implemented: this server watches "
            f"{self.manager.model_dir} for new versions instead",
        )
