"""One Predict, whatever the front end: resolve the version, adapt the inputs, call, count.

gRPC and REST differ only in how inputs are decoded (TensorProtos or JSON) and answers encoded;
resolution, checks, metrics and error mapping live here once.
"""

import time
from collections.abc import Callable, Iterable

import numpy as np

from serving.errors import RequestError
from serving.metrics import ServingMetrics
from serving.models import ModelRegistry
from serving.signatures import LoadedVersion, Signature

Decoder = Callable[[Signature], dict[str, np.ndarray]]
OK = "OK"


class Predictor:
    """Predict with metrics: every request is counted once, with its final status. Labels carry
    only configured names (an unknown model or signature counts as ""), so hostile requests
    cannot grow the metrics without bound."""

    def __init__(self, registry: ModelRegistry, metrics: ServingMetrics):
        self.registry = registry
        self.metrics = metrics

    def predict(
        self,
        api: str,
        model: str,
        version: int | None,
        label: str,
        signature_name: str,
        decode: Decoder,
        output_filter: Iterable[str] = (),
    ) -> tuple[LoadedVersion, Signature, dict[str, np.ndarray]]:
        metrics = self.metrics
        metrics.enter()
        started = time.perf_counter()
        names = ("", "", "")
        status = OK
        try:
            loaded = self.registry.resolve(model, version, label)
            names = (loaded.model_name, str(loaded.version), "")
            signature = loaded.signature(signature_name)
            names = (names[0], names[1], signature.name)
            outputs = signature.run(decode(signature), output_filter)
            return loaded, signature, outputs
        except RequestError as error:
            status = error.code.name
            raise
        except Exception:
            status = "INTERNAL"
            raise
        finally:
            metrics.leave()
            metrics.observe(*names, api, status, time.perf_counter() - started)
