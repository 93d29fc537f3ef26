"""The TF Serving gRPC API (PredictionService, ModelService) over a `ModelRegistry`.

Only the standard protos and stubs of `tensorflow-serving-api`: any TF Serving client works
against this server, and this project's client works against TF Serving.
"""

import logging
from collections.abc import Callable

import grpc
from google.protobuf import any_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.config import ConfigError
from serving.errors import RequestError, invalid_argument
from serving.model_config import specs_from_proto
from serving.models import ModelRegistry
from serving.predict import Predictor
from serving.signatures import LoadedVersion
from serving.tensors import encode_tensor

log = logging.getLogger(__name__)

SIGNATURE_DEF_FIELD = "signature_def"
_STATES = get_model_status_pb2.ModelVersionStatus.State
_UNKNOWN_ERROR = 2  # tensorflow.error.Code.UNKNOWN


def _requested_version(spec) -> int | None:
    return spec.version.value if spec.HasField("version") else None


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

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.registry = predictor.registry

    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        try:
            spec = request.model_spec
            inputs = request.inputs
            loaded, signature, outputs = self.predictor.predict(
                "grpc",
                spec.name,
                _requested_version(spec),
                spec.version_label,
                spec.signature_name,
                lambda signature: signature.decode(inputs),
                request.output_filter,
            )
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
            loaded = self.registry.resolve(spec.name, _requested_version(spec), spec.version_label)
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
            f"{method} is not implemented by this server: use Predict",
        )

    def Classify(self, request, context):
        self._unimplemented(context, "Classify")

    def Regress(self, request, context):
        self._unimplemented(context, "Regress")

    def MultiInference(self, request, context):
        self._unimplemented(context, "MultiInference")


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus (loaded versions AVAILABLE, a failed one END with its error) and
    HandleReloadConfigRequest (a new model_config_list, applied before the answer)."""

    def __init__(
        self,
        registry: ModelRegistry,
        on_reload: Callable[[list], None] | None = None,
        apply: Callable[[model_management_pb2.ReloadConfigRequest, list], None] | None = None,
    ):
        self.registry = registry
        self.on_reload = on_reload
        # (request, specs) -> None; in a group of gRPC processes, applies it in all of them.
        self.apply = apply or (lambda _request, specs: registry.apply(specs))

    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context
    ) -> get_model_status_pb2.GetModelStatusResponse:
        try:
            spec = request.model_spec
            manager = self.registry.manager(spec.name)
            version = _requested_version(spec)
            if spec.version_label:
                version = manager.resolve(None, spec.version_label).version
            states = manager.states(version)
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

    def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest, context
    ) -> model_management_pb2.ReloadConfigResponse:
        try:
            specs = specs_from_proto(request.config)
        except ConfigError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ReloadConfig: {error}")
        try:
            self.apply(request, specs)
            if self.on_reload is not None:
                self.on_reload(specs)
        except Exception as error:
            _abort_with(context, error, "HandleReloadConfigRequest")
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = 0
        return response
