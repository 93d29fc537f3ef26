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
OUT_COLD_START = "cold_start"  # per-row bool output of the retrieval signatures (newer exports)
DEFAULT_K = 10  # what serving_default returns (TrainingConfig.top_k of the exports)


class Recommendation(NamedTuple):
    movie_id: int | str  # the raw id, as in the data (text for string ids)
    title: str | None  # None when no catalogue was given or the id is not in it
    score: float  # retrieval score (higher is better)
    stars: float | None  # predicted rating, 1..5; None when the model has no `rank` signature
    # The user is unknown to the model: these are the training data's most rated movies.
    cold_start: bool = False


class Retrieval(NamedTuple):
    movie_ids: np.ndarray  # [users, k] integer ids (-1 pads) or bytes ids (b"" pads)
    scores: np.ndarray  # [users, k] float32; -inf at the padding
    version: int
    cold_start: np.ndarray | None = None  # [users] bool: user unknown to the model (if reported)


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


def load_titles(path: str) -> dict[int | str, str]:
    """Movie id -> title from the pipeline's catalogue: a movies.tsv file or a folder holding
    one (the `mtrec run` output folder, or the ingestion movies artifact). Integer ids are
    keyed as ints, any other raw id as its text."""
    from components.errors import DataError

    if os.path.isdir(path):
        path = os.path.join(path, F.MOVIES_FILE)
    if not os.path.isfile(path):
        raise DataError(
            f"{path}: not found (pass a {F.MOVIES_FILE} file or the folder holding it, e.g. the "
            "`mtrec run` output folder)"
        )
    titles: dict[int | str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            movie_id, tab, title = line.rstrip("\n").partition("\t")
            try:
                if not tab or not movie_id:
                    raise ValueError
                titles[_catalogue_id(movie_id)] = title
            except ValueError:
                raise DataError(
                    f"{path}, line {number}: expected movie_id<TAB>title, got {line[:60]!r}"
                ) from None
    return titles


def _catalogue_id(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


_INT_RANGES = {"int32": np.iinfo(np.int32), "int64": np.iinfo(np.int64)}


def _ids(values: Any, name: str, dtype: str = "int32", ndim: int = 1) -> np.ndarray:
    """Ids as the signature declares them: `dtype` is "int32", "int64" or "string" (the
    TensorFlow name). Integers are refused for floats and overflow; strings are sent as UTF-8
    bytes, and an integer given for a string id is sent as its decimal text (raw ids, as in the
    data); a decimal string given for an integer id is parsed."""
    array = np.asarray(values, dtype=object if dtype == "string" else None)
    if array.ndim == ndim - 1 and ndim == 1:
        array = array.reshape(1)
    if array.ndim != ndim:
        raise ServingClientError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if dtype == "string":
        return _as_strings(array, name)
    if dtype not in _INT_RANGES:
        raise ServingClientError(f"{name}: the server declares {dtype}, not an id type")
    if array.size and array.dtype.kind in "USO":
        array = _parse_integers(array, name)
    if array.size and array.dtype.kind not in "iu":
        raise ServingClientError(f"{name} must be integers, got {array.dtype.name}")
    info = _INT_RANGES[dtype]
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ServingClientError(f"{name} must fit in {dtype}")
    return array.astype(dtype)


def _as_strings(array: np.ndarray, name: str) -> np.ndarray:
    out = np.empty(array.shape, object)
    flat = out.reshape(-1)
    for index, item in enumerate(array.reshape(-1)):
        if isinstance(item, bytes):
            flat[index] = item
        elif isinstance(item, str):
            flat[index] = item.encode("utf-8")
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            flat[index] = str(int(item)).encode("ascii")
        else:
            raise ServingClientError(f"{name} must be strings, got {type(item).__name__}")
    return out


def _parse_integers(array: np.ndarray, name: str) -> np.ndarray:
    try:
        return np.vectorize(
            lambda v: int(v.decode() if isinstance(v, bytes) else v), otypes=[np.int64]
        )(array)
    except (ValueError, TypeError, OverflowError):
        raise ServingClientError(
            f"{name} must be integers, got {array.reshape(-1)[:3].tolist()}"
        ) from None


def _python_id(value: Any) -> int | str:
    """An id from a response as Python: int, or text for string ids."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return int(value)


def _is_padding(ids: np.ndarray) -> np.ndarray:
    """Retrieval pads with -1 (integer ids) or "" (string ids) when fewer than k remain."""
    if ids.dtype == object or ids.dtype.kind == "S":
        return np.vectorize(lambda v: len(v) == 0, otypes=[bool])(ids) if ids.size else ids == b""
    return ids == -1


class RecommenderClient:
    """Retrieve, rank and recommend through a model server; status and metadata for checks."""

    def __init__(
        self,
        target: str,
        model_name: str = "mtrec",
        *,
        version: int | None = None,
        timeout: float = 10.0,
        titles: dict[int | str, str] | None = None,
    ):
        self.target = target
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self.titles = titles or {}
        self._signatures: dict[str, SignatureInfo] | None = None
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

    # --- what the served model declares ---

    def signatures(self, refresh: bool = False) -> dict[str, SignatureInfo]:
        """The served version's signatures (GetModelMetadata), fetched once per client."""
        if self._signatures is None or refresh:
            self._signatures = self.metadata()
        return self._signatures

    def _dtype(self, signature: str, name: str) -> str:
        info = self.signatures().get(signature)
        if info is None:
            raise ServingClientError(
                f"model {self.model_name!r} at {self.target} has no signature {signature!r} "
                f"(it has {', '.join(sorted(self.signatures()))})"
            )
        if name not in info.inputs:
            raise ServingClientError(f"signature {signature!r} has no input {name!r}")
        return info.inputs[name][0]

    def _predict_ids(self, signature: str, build) -> tuple[dict[str, np.ndarray], int]:
        """Predict with inputs built for the declared dtypes (`build(dtype_of)`). When the
        server refuses them as INVALID_ARGUMENT and a new version changed the dtypes since
        they were read, read them again and retry once."""
        dtypes = (
            {n: t for n, (t, _) in self.signatures()[signature].inputs.items()}
            if (signature in self.signatures())
            else None
        )
        try:
            return self.predict(signature, build(lambda n: self._dtype(signature, n)))
        except ServingClientError as error:
            if error.code != grpc.StatusCode.INVALID_ARGUMENT or dtypes is None:
                raise
            fresh = self.signatures(refresh=True).get(signature)
            if fresh is None or {n: t for n, (t, _) in fresh.inputs.items()} == dtypes:
                raise
            return self.predict(signature, build(lambda n: self._dtype(signature, n)))

    def has_signature(self, name: str) -> bool:
        return name in self.signatures()

    # --- the recommender's signatures ---

    def retrieve(
        self,
        user_ids: Sequence[int | str] | np.ndarray | int | str,
        excluded_movie_ids: Any = None,
        k: int | None = None,
    ) -> Retrieval:
        """Top-k movies per user. Without `excluded_movie_ids`: `serving_default` (the export's
        k), or `retrieve_k` when `k` is given (1..features.MAX_REQUEST_K), both skipping the
        movies each user rated; with it ([users, n] ids, padded with -1 or ""; [users, 0] for
        none): `retrieve_excluding`, which skips only those. Ids go as the signature declares
        them (int32, int64 or string)."""
        signature = F.SIGNATURE_RETRIEVE
        if k is not None and excluded_movie_ids is None:
            signature = F.SIGNATURE_RETRIEVE_K
        if excluded_movie_ids is not None:
            signature = F.SIGNATURE_RETRIEVE_EXCLUDING

        def build(dtype_of) -> dict[str, np.ndarray]:
            inputs = {F.USER_ID: _ids(user_ids, F.USER_ID, dtype_of(F.USER_ID))}
            if signature == F.SIGNATURE_RETRIEVE_K:
                inputs[F.K] = np.asarray(k, dtype_of(F.K))
            if excluded_movie_ids is not None:
                inputs[F.EXCLUDED_MOVIE_IDS] = _ids(
                    excluded_movie_ids, F.EXCLUDED_MOVIE_IDS, dtype_of(F.EXCLUDED_MOVIE_IDS), 2
                )
            return inputs

        outputs, version = self._predict_ids(signature, build)
        return Retrieval(
            outputs[F.OUT_MOVIE_IDS], outputs[F.OUT_SCORES], version, outputs.get(OUT_COLD_START)
        )

    def rank(self, user_ids: Any, movie_ids: Any) -> Ranking:
        """Predicted rating of each (user, movie) pair, in one batched request."""

        def build(dtype_of) -> dict[str, np.ndarray]:
            users = _ids(user_ids, F.USER_ID, dtype_of(F.USER_ID))
            movies = _ids(movie_ids, F.MOVIE_ID, dtype_of(F.MOVIE_ID))
            if users.shape != movies.shape:
                raise ServingClientError(
                    f"user_ids and movie_ids must have the same length "
                    f"({users.size} != {movies.size})"
                )
            return {F.USER_ID: users, F.MOVIE_ID: movies}

        outputs, version = self._predict_ids(F.SIGNATURE_RANK, build)
        return Ranking(outputs[F.OUT_RATING], outputs[F.OUT_STARS], version)

    def recommend(
        self, user_id: int | str, k: int = 10, include_seen: bool = False, by_rating: bool = False
    ) -> list[Recommendation]:
        """The user's top-k with predicted stars: one retrieval call and one batched rank call
        (no stars when the model has no `rank` signature, e.g. implicit feedback).
        Beyond the export's k (10), seen movies excluded, it asks `retrieve_k`; with
        `include_seen`, at most the export's k. `include_seen` keeps movies the user already rated (the seed's
        behaviour); `by_rating` orders the retrieved movies by predicted stars (retrieve, then
        rank) instead of by retrieval score."""
        if k <= 0:
            raise ServingClientError(f"k must be positive, got {k}")
        ranks = self.has_signature(F.SIGNATURE_RANK)
        if by_rating and not ranks:
            raise ServingClientError(
                f"model {self.model_name!r} has no {F.SIGNATURE_RANK!r} signature (implicit "
                "feedback): nothing to order by rating"
            )
        excluded = [[]] if include_seen else None
        wide = k > DEFAULT_K and not include_seen  # older exports lack retrieve_k: only then
        retrieved = self.retrieve([user_id], excluded, k=k if wide else None)
        ids, scores = retrieved.movie_ids[0], retrieved.scores[0]
        keep = ~_is_padding(ids)
        ids, scores = ids[keep][:k], scores[keep][:k]
        if ids.size == 0:
            return []
        stars = self.rank([user_id] * ids.size, ids).stars if ranks else [None] * ids.size
        cold = retrieved.cold_start is not None and bool(retrieved.cold_start[0])
        recommendations = [
            Recommendation(
                _python_id(m),
                self._title(_python_id(m)),
                float(s),
                None if r is None else float(r),
                cold,
            )
            for m, s, r in zip(ids, scores, stars, strict=True)
        ]
        if by_rating:
            recommendations.sort(key=lambda rec: rec.stars, reverse=True)
        return recommendations

    def _title(self, movie_id: int | str) -> str | None:
        """The catalogue's title, whichever way (int or text) its ids were read."""
        found = self.titles.get(movie_id)
        if found is None:
            found = self.titles.get(str(movie_id))
        if found is None and isinstance(movie_id, str) and movie_id.isdigit():
            found = self.titles.get(int(movie_id))
        return found

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
    user_id: int | str, recommendations: list[Recommendation], include_seen: bool
) -> str:
    """The seed's last cell, as text: rank, title and predicted stars per movie."""
    scope = "rated movies included" if include_seen else "movies the user rated excluded"
    lines = [f"Top {len(recommendations)} movies for user {user_id} ({scope}):"]
    if any(rec.cold_start for rec in recommendations):
        lines[0] = (
            f"User {user_id} is unknown to the model (cold start): the {len(recommendations)} "
            f"most rated movies of its training data ({scope}):"
        )
    width = max((len(r.title or f"movie {r.movie_id}") for r in recommendations), default=0)
    for rank, rec in enumerate(recommendations, start=1):
        title = rec.title or f"movie {rec.movie_id}"
        stars = f"{rec.stars:.2f} stars" if rec.stars is not None else f"score {rec.score:.3f}"
        lines.append(f"{rank:>3}. {title:<{width}}  {stars}  (movie {rec.movie_id})")
    if not recommendations:
        lines.append("  (nothing left to recommend)")
    return "\n".join(lines)
