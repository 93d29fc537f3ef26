"""A small client for the recommender over the TF Serving gRPC API (this server or TF Serving).

    with RecommenderClient("localhost:8500") as client:
        for rec in client.recommend(5):
            print(rec.title, rec.stars)

Every failure (server down, request refused) is a `ServingClientError` with a one-line message.
"""

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from components import features as F
from serving.errors import ServingClientError

_STATES = get_model_status_pb2.ModelVersionStatus.State
DEFAULT_K = 10  # what serving_default returns (TrainingConfig.top_k of the exports)


class Recommendation(NamedTuple):
    movie_id: int
    title: str | None  # None when no catalogue was given or the id is not in it
    score: float  # retrieval score (higher is better)
    stars: float  # predicted rating, 1..5


class Retrieval(NamedTuple):
    movie_ids: np.ndarray  # [users, k] int32; -1 pads when fewer than k movies remain
    scores: np.ndarray  # [users, k] float32; -inf at the padding
    version: int


class Ranking(NamedTuple):
    rating: np.ndarray  # [n] float32 in [0, 1]
    stars: np.ndarray  # [n] float32 in [1, 5]
    version: int


class VersionStatus(NamedTuple):
    version: int
    state: str  # AVAILABLE, LOADING, END, ...
    error: str  # empty when OK


class SignatureInfo(NamedTuple):
    inputs: dict[str, tuple[str, list[int]]]  # name -> (dtype, shape; -1 = any)
    outputs: dict[str, tuple[str, list[int]]]


def load_titles(path: str) -> dict[int, str]:
    """Movie id -> title from the pipeline's catalogue: a movies.tsv file or a folder holding
    one (the `mtrec run` output folder, or the ingestion movies artifact)."""
    from components.errors import DataError

    if os.path.isdir(path):
        path = os.path.join(path, F.MOVIES_FILE)
    if not os.path.isfile(path):
        raise DataError(
            f"{path}: not found (pass a {F.MOVIES_FILE} file or the folder holding it, e.g. the "
            "`mtrec run` output folder)"
        )
    titles: dict[int, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            movie_id, tab, title = line.rstrip("\n").partition("\t")
            try:
                if not tab:
                    raise ValueError
                titles[int(movie_id)] = title
            except ValueError:
                raise DataError(
                    f"{path}, line {number}: expected movie_id<TAB>title, got {line[:60]!r}"
                ) from None
    return titles


def _ids(values: Any, name: str, ndim: int = 1) -> np.ndarray:
    """Integer ids as int32 (the signatures' dtype), refusing floats and overflow."""
    array = np.asarray(values)
    if array.ndim == ndim - 1 and ndim == 1:
        array = array.reshape(1)
    if array.size and array.dtype.kind not in "iu":
        raise ServingClientError(f"{name} must be integers, got {array.dtype.name}")
    if array.size and (
        array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max
    ):
        raise ServingClientError(f"{name} must fit in int32")
    if array.ndim != ndim:
        raise ServingClientError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    return array.astype(np.int32)


class RecommenderClient:
    """Retrieve, rank and recommend through a model server; status and metadata for checks."""

    def __init__(
        self,
        target: str,
        model_name: str = "mtrec",
        *,
        version: int | None = None,
        timeout: float = 10.0,
        titles: dict[int, str] | None = None,
    ):
        self.target = target
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self.titles = titles or {}
        self._channel = grpc.insecure_channel(target)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    # --- plumbing ---

    def _spec(self, spec, signature: str = "") -> None:
        spec.name = self.model_name
        if self.version is not None:
            spec.version.value = self.version
        if signature:
            spec.signature_name = signature

    def _call(self, method, request, what: str):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise self._error(error, what) from None

    def _error(self, error: grpc.RpcError, what: str) -> ServingClientError:
        code = error.code() if hasattr(error, "code") else None
        details = (error.details() if hasattr(error, "details") else "") or ""
        details = details.strip().splitlines()[0] if details.strip() else ""
        if code == grpc.StatusCode.UNAVAILABLE and "no version" not in details:
            message = f"cannot reach the model server at {self.target} ({details or 'unavailable'})"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            message = f"{self.target} did not answer {what} within {self.timeout:g}s"
        else:
            name = code.name if code is not None else "error"
            message = f"{self.target} refused {what}: {name}: {details}"
        return ServingClientError(message, code)

    def predict(
        self, signature: str, inputs: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], int]:
        """Any signature: numpy inputs -> (numpy outputs, version that answered)."""
        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, signature)
        for name, array in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
        response = self._call(self._predict.Predict, request, f"Predict ({signature})")
        outputs = {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}
        return outputs, response.model_spec.version.value

    # --- the recommender's signatures ---

    def retrieve(
        self,
        user_ids: Sequence[int] | np.ndarray | int,
        excluded_movie_ids: Any = None,
        k: int | None = None,
    ) -> Retrieval:
        """Top-k movies per user. Without `excluded_movie_ids`: `serving_default` (the export's
        k), or `retrieve_k` when `k` is given (1..features.MAX_REQUEST_K), both skipping the
        movies each user rated; with it ([users, n] ids, 0-padded; [users, 0] for none):
        `retrieve_excluding`, which skips only those."""
        inputs = {F.USER_ID: _ids(user_ids, F.USER_ID)}
        signature = F.SIGNATURE_RETRIEVE
        if k is not None and excluded_movie_ids is None:
            signature = F.SIGNATURE_RETRIEVE_K
            inputs[F.K] = np.asarray(k, np.int32)
        if excluded_movie_ids is not None:
            signature = F.SIGNATURE_RETRIEVE_EXCLUDING
            inputs[F.EXCLUDED_MOVIE_IDS] = _ids(excluded_movie_ids, F.EXCLUDED_MOVIE_IDS, ndim=2)
        outputs, version = self.predict(signature, inputs)
        return Retrieval(outputs[F.OUT_MOVIE_IDS], outputs[F.OUT_SCORES], version)

    def rank(self, user_ids: Any, movie_ids: Any) -> Ranking:
        """Predicted rating of each (user, movie) pair, in one batched request."""
        users, movies = _ids(user_ids, F.USER_ID), _ids(movie_ids, F.MOVIE_ID)
        if users.shape != movies.shape:
            raise ServingClientError(
                f"user_ids and movie_ids must have the same length ({users.size} != {movies.size})"
            )
        outputs, version = self.predict(F.SIGNATURE_RANK, {F.USER_ID: users, F.MOVIE_ID: movies})
        return Ranking(outputs[F.OUT_RATING], outputs[F.OUT_STARS], version)

    def recommend(
        self, user_id: int, k: int = 10, include_seen: bool = False, by_rating: bool = False
    ) -> list[Recommendation]:
        """The user's top-k with predicted stars: one retrieval call and one batched rank call.
        Beyond the export's k (10), seen movies excluded, it asks `retrieve_k`; with
        `include_seen`, at most the export's k. `include_seen` keeps movies the user already rated (the seed's
        behaviour); `by_rating` orders the retrieved movies by predicted stars (retrieve, then
        rank) instead of by retrieval score."""
        if k <= 0:
            raise ServingClientError(f"k must be positive, got {k}")
        excluded = np.zeros([1, 0], np.int32) if include_seen else None
        wide = k > DEFAULT_K and not include_seen  # older exports lack retrieve_k: only then
        retrieved = self.retrieve([user_id], excluded, k=k if wide else None)
        ids, scores = retrieved.movie_ids[0], retrieved.scores[0]
        keep = ids > 0  # -1 pads when fewer than k movies remain
        ids, scores = ids[keep][:k], scores[keep][:k]
        if ids.size == 0:
            return []
        stars = self.rank(np.full(ids.shape, user_id, np.int32), ids).stars
        recommendations = [
            Recommendation(int(m), self.titles.get(int(m)), float(s), float(r))
            for m, s, r in zip(ids, scores, stars, strict=True)
        ]
        if by_rating:
            recommendations.sort(key=lambda rec: rec.stars, reverse=True)
        return recommendations

    # --- checks ---

    def status(self) -> list[VersionStatus]:
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec)
        response = self._call(self._models.GetModelStatus, request, "GetModelStatus")
        return [
            VersionStatus(s.version, _STATES.Name(s.state), s.status.error_message)
            for s in response.model_version_status
        ]

    def metadata(self) -> dict[str, SignatureInfo]:
        """Signature name -> inputs and outputs (dtype, shape), from GetModelMetadata."""
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._spec(request.model_spec)
        request.metadata_field.append("signature_def")
        response = self._call(self._predict.GetModelMetadata, request, "GetModelMetadata")
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)

        def describe(tensors) -> dict[str, tuple[str, list[int]]]:
            return {
                name: (tf.dtypes.as_dtype(info.dtype).name, [d.size for d in info.tensor_shape.dim])
                for name, info in tensors.items()
            }

        return {
            name: SignatureInfo(describe(sig.inputs), describe(sig.outputs))
            for name, sig in signature_map.signature_def.items()
        }

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RecommenderClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_recommendations(
    user_id: int, recommendations: list[Recommendation], include_seen: bool
) -> str:
    """The seed's last cell, as text: rank, title and predicted stars per movie."""
    scope = "rated movies included" if include_seen else "movies the user rated excluded"
    lines = [f"Top {len(recommendations)} movies for user {user_id} ({scope}):"]
    width = max((len(r.title or f"movie {r.movie_id}") for r in recommendations), default=0)
    for rank, rec in enumerate(recommendations, start=1):
        title = rec.title or f"movie {rec.movie_id}"
        lines.append(f"{rank:>3}. {title:<{width}}  {rec.stars:.2f} stars  (movie {rec.movie_id})")
    if not recommendations:
        lines.append("  (nothing left to recommend)")
    return "\n".join(lines)
