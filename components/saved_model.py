"""The model artifact: the serving SavedModel that training writes and every later stage uses.

Training writes it; evaluation scores it through its signatures; infra-validation loads it as TF
Serving does; the pusher copies it byte for byte. Nothing is rebuilt between, so the model that is
served is the model that was gated. Layout (TF Serving's version folder):

    saved_model.pb, variables/          the signatures and the tables they need
    assets.extra/mtrec.json             metadata: sizes, k, signatures, configuration
    assets.extra/history.json           per-epoch training and validation metrics
    assets.extra/tf_serving_warmup_requests   PredictionLog records TF Serving replays on load

Signatures (names in `features`):
- `serving_default`: user_id -> top-k movie_ids, scores, skipping every movie the user rated in
  the data the pipeline ingested (the export carries that table);
- `retrieve_excluding`: user_id, excluded_movie_ids -> top-k, skipping only the ids given;
- `rank`: user_id, movie_id -> rating in [0, 1] and stars in [1, 5];
- `retrieve_k`: user_id, scalar k (1..MAX_REQUEST_K) -> top-k as `serving_default`, k columns
  (padded with -1 / -inf past the number of candidates).
"""

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from components import features as F
from components.errors import DataError
from components.layout import METADATA_DIR, METADATA_FILE, SAVED_MODEL_FILE, WARMUP_FILE

HISTORY_FILE = F.HISTORY_FILE
WARMUP_USERS = 4  # ids per warmup request
SIGNATURES = (
    F.SIGNATURE_RETRIEVE,
    F.SIGNATURE_RETRIEVE_EXCLUDING,
    F.SIGNATURE_RANK,
    F.SIGNATURE_RETRIEVE_K,
)
WARMUP_K = 5
SCORING_BATCH = 1024  # users per retrieval call when scoring a whole split


def _check_ids(ids, upper: int, name: str):
    """Reject ids outside the embedding tables with a message naming the input; the checks run
    before any lookup uses the ids (on a GPU an out-of-range gather would silently give zeros)."""
    import tensorflow as tf

    ids = tf.convert_to_tensor(ids)
    message = f"unknown {name}: ids must be in 1..{upper - 1}"
    checks = [
        tf.debugging.assert_rank(ids, 1, message=f"{name} must be a 1-D batch of ids"),
        tf.debugging.assert_greater_equal(ids, 1, message=message),
        tf.debugging.assert_less(ids, upper, message=message),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(ids)


def build_export_archive(model, seen, stars_range: tuple[float, float] = F.DEFAULT_STARS_RANGE):
    """The serving signatures over a trained `Recommender` and its table of rated movies;
    `stars` outputs are on the data set's own scale."""
    import keras
    import tensorflow as tf

    model.index_candidates()
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.track(seen)

    def retrieve(user_id):
        user_id = _check_ids(user_id, model.num_users, F.USER_ID)
        scores, ids = model.recommend(user_id, seen=seen)
        return {F.OUT_MOVIE_IDS: ids, F.OUT_SCORES: scores}

    def retrieve_excluding(user_id, excluded_movie_ids):
        user_id = _check_ids(user_id, model.num_users, F.USER_ID)
        same_batch = tf.debugging.assert_equal(
            tf.shape(user_id)[0],
            tf.shape(excluded_movie_ids)[0],
            message="user_id and excluded_movie_ids must have the same batch size",
        )
        with tf.control_dependencies([same_batch]):
            excluded_movie_ids = tf.identity(excluded_movie_ids)
        scores, ids = model.recommend(user_id, excluded_movie_ids=excluded_movie_ids)
        return {F.OUT_MOVIE_IDS: ids, F.OUT_SCORES: scores}

    def rank(user_id, movie_id):
        user_id = _check_ids(user_id, model.num_users, F.USER_ID)
        movie_id = _check_ids(movie_id, model.num_movies, F.MOVIE_ID)
        tf.debugging.assert_equal(
            tf.shape(user_id),
            tf.shape(movie_id),
            message="user_id and movie_id must have the same length",
        )
        rating = model.predict_rating(user_id, movie_id)
        return {F.OUT_RATING: rating, F.OUT_STARS: F.denormalise_rating(rating, stars_range)}

    def retrieve_k(user_id, k):
        from components.model import NO_MOVIE

        user_id = _check_ids(user_id, model.num_users, F.USER_ID)
        message = f"k must be in 1..{F.MAX_REQUEST_K}"
        checks = [
            tf.debugging.assert_greater_equal(k, 1, message=message),
            tf.debugging.assert_less_equal(k, F.MAX_REQUEST_K, message=message),
        ]
        with tf.control_dependencies(checks):
            k = tf.identity(k)
        widest = min(F.MAX_REQUEST_K, len(model.candidate_ids))  # static: top-k sorts
        scores, ids = model.recommend(user_id, k=widest, seen=seen)
        taken = tf.minimum(k, widest)
        padding = [[0, 0], [0, k - taken]]
        return {
            F.OUT_MOVIE_IDS: tf.pad(ids[:, :taken], padding, constant_values=NO_MOVIE),
            F.OUT_SCORES: tf.pad(scores[:, :taken], padding, constant_values=float("-inf")),
        }

    user_spec = tf.TensorSpec([None], tf.int32, name=F.USER_ID)
    archive.add_endpoint(F.SIGNATURE_RETRIEVE, retrieve, input_signature=[user_spec])
    archive.add_endpoint(
        F.SIGNATURE_RETRIEVE_EXCLUDING,
        retrieve_excluding,
        input_signature=[
            user_spec,
            tf.TensorSpec([None, None], tf.int32, name=F.EXCLUDED_MOVIE_IDS),
        ],
    )
    archive.add_endpoint(
        F.SIGNATURE_RANK,
        rank,
        input_signature=[user_spec, tf.TensorSpec([None], tf.int32, name=F.MOVIE_ID)],
    )
    archive.add_endpoint(
        F.SIGNATURE_RETRIEVE_K,
        retrieve_k,
        input_signature=[user_spec, tf.TensorSpec([], tf.int32, name=F.K)],
    )
    return archive


def warmup_inputs(num_users: int, num_movies: int) -> dict[str, dict[str, np.ndarray]]:
    """A small, valid request per signature (TF Serving replays them before serving)."""
    users = (np.arange(WARMUP_USERS) % (num_users - 1) + 1).astype(np.int32)
    movies = (np.arange(WARMUP_USERS) % (num_movies - 1) + 1).astype(np.int32)
    return {
        F.SIGNATURE_RETRIEVE: {F.USER_ID: users},
        F.SIGNATURE_RETRIEVE_EXCLUDING: {
            F.USER_ID: users,
            F.EXCLUDED_MOVIE_IDS: np.stack([movies, np.zeros_like(movies)], axis=1),
        },
        F.SIGNATURE_RANK: {F.USER_ID: users, F.MOVIE_ID: movies},
        F.SIGNATURE_RETRIEVE_K: {F.USER_ID: users, F.K: np.int32(WARMUP_K)},
    }


def write_warmup_requests(path: str, model_name: str, inputs: dict[str, dict]) -> None:
    """TF Serving's warmup file: a TFRecord of PredictionLog, one Predict request each."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    with tf.io.TFRecordWriter(path) as writer:
        for signature, arrays in inputs.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            for name, array in arrays.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())


def read_warmup_requests(model_dir: str) -> Iterator[Any]:
    """The PredictRequests of a SavedModel's warmup file (none when it has no such file)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(model_dir, METADATA_DIR, WARMUP_FILE)
    if not os.path.isfile(path):
        return
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        yield log.predict_log.request


def write_saved_model(
    model,
    seen,
    path: str,
    history: dict[str, list[float]],
    metadata: dict[str, Any],
    model_name: str = F.DEFAULT_MODEL_NAME,
) -> str:
    """Write the SavedModel, its metadata, history and warmup requests into `path` (a staging
    folder: the caller publishes it atomically)."""
    stars_range = tuple(metadata.get("stars_range", F.DEFAULT_STARS_RANGE))
    build_export_archive(model, seen, stars_range).write_out(path, verbose=False)
    extra = os.path.join(path, METADATA_DIR)
    os.makedirs(extra, exist_ok=True)
    info = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_users": model.num_users,
        "num_movies": model.num_movies,
        "k": model.config.top_k,
        "signatures": list(SIGNATURES),
        "training_config": model.config.to_dict(),
        **metadata,
    }
    with open(os.path.join(extra, METADATA_FILE), "w", encoding="utf-8") as out:
        json.dump(info, out, indent=2)
    with open(os.path.join(extra, HISTORY_FILE), "w", encoding="utf-8") as out:
        json.dump(history, out)
    write_warmup_requests(
        os.path.join(extra, WARMUP_FILE),
        model_name,
        warmup_inputs(model.num_users, model.num_movies),
    )
    return path


def check_model_dir(path: str) -> None:
    for name in (SAVED_MODEL_FILE, os.path.join(METADATA_DIR, METADATA_FILE)):
        if not os.path.isfile(os.path.join(path, name)):
            raise DataError(
                f"{os.path.join(path, name)}: not found (expected a SavedModel written by training)"
            )


def read_metadata(path: str) -> dict[str, Any]:
    check_model_dir(path)
    with open(os.path.join(path, METADATA_DIR, METADATA_FILE), encoding="utf-8") as handle:
        return json.load(handle)


def read_history(path: str) -> dict[str, list[float]]:
    history_path = os.path.join(path, METADATA_DIR, HISTORY_FILE)
    if not os.path.isfile(history_path):
        return {}
    with open(history_path, encoding="utf-8") as handle:
        return json.load(handle)


class ServedModel:
    """A SavedModel used only through its serving signatures, as a client of TF Serving would:
    evaluation scores the candidate and the previously blessed model with this one class."""

    def __init__(self, path: str):
        import tensorflow as tf

        self.path = path
        self.info = read_metadata(path)
        self.num_users = int(self.info["num_users"])
        self.num_movies = int(self.info["num_movies"])
        self.k = int(self.info["k"])
        loaded = tf.saved_model.load(path)
        self._loaded = loaded  # keeps the signatures' variables alive
        self._retrieve = loaded.signatures[F.SIGNATURE_RETRIEVE_EXCLUDING]
        self._rank = loaded.signatures[F.SIGNATURE_RANK]

    def top_k(self, users: np.ndarray, excluded: list[np.ndarray] | None = None) -> np.ndarray:
        """[len(users), k] movie ids (-1 where fewer remain); `excluded[i]` are the movie ids
        to skip for users[i] (e.g. the movies rated in training)."""
        import tensorflow as tf

        users = np.asarray(users, dtype=np.int32)
        out = np.full((len(users), self.k), -1, dtype=np.int32)
        for start in range(0, len(users), SCORING_BATCH):
            batch = users[start : start + SCORING_BATCH]
            rows = excluded[start : start + len(batch)] if excluded is not None else []
            width = max((len(r) for r in rows), default=0) or 1
            dense = np.zeros((len(batch), width), dtype=np.int32)
            for i, row in enumerate(rows):
                dense[i, : len(row)] = row
            result = self._retrieve(
                user_id=tf.constant(batch), excluded_movie_ids=tf.constant(dense)
            )
            out[start : start + len(batch)] = result[F.OUT_MOVIE_IDS].numpy()
        return out

    def predict_rating(self, users: np.ndarray, movies: np.ndarray) -> np.ndarray:
        """Normalised ratings in [0, 1] through the `rank` signature."""
        import tensorflow as tf

        out = np.zeros(len(users), dtype=np.float32)
        for start in range(0, len(users), 65_536):
            stop = start + 65_536
            out[start:stop] = self._rank(
                user_id=tf.constant(np.asarray(users[start:stop], np.int32)),
                movie_id=tf.constant(np.asarray(movies[start:stop], np.int32)),
            )[F.OUT_RATING].numpy()
        return out


def export_saved_model(
    model, seen, base_dir: str, model_name: str = F.DEFAULT_MODEL_NAME, version: int | None = None
) -> str:
    """Write a SavedModel straight into a local TF Serving layout, `<base>/<name>/<version>/`
    (tests and benchmarks; a pipeline pushes the trained artifact with `components.pusher`)."""
    from components.layout import list_versions
    from components.storage import atomic_output_dir

    model_dir = os.path.join(base_dir, model_name)
    if version is None:
        existing = list_versions(model_dir)
        version = existing[-1] + 1 if existing else 1
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise DataError(f"{final} already exists: versions are never overwritten")
    with atomic_output_dir(final) as staging:
        write_saved_model(model, seen, staging, {}, {}, model_name)
    return final
