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
from components.artifacts.model_versions import (
    METADATA_DIR,
    METADATA_FILE,
    SAVED_MODEL_FILE,
    WARMUP_FILE,
)
from components.artifacts.vocabulary import INT64
from components.errors import DataError

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


class IdLookups:
    """The vocabularies inside the SavedModel (TFX Transform's apply step, in the graph): raw
    ids in -> vocabulary indices (0: unknown), indices out -> raw ids. Tables are built from
    constants, so the SavedModel is self-contained."""

    def __init__(self, vocabularies):
        import tensorflow as tf

        self.module = tf.Module(name="id_lookups")
        self.kinds = {"user": vocabularies.users.kind, "movie": vocabularies.movies.kind}
        self.module.users = self._to_index(vocabularies.users)
        self.module.movies = self._to_index(vocabularies.movies)
        tokens = vocabularies.movies.tokens
        missing = vocabularies.movies.missing
        self.module.movie_tokens = tf.Variable(
            np.concatenate([[missing], tokens]).astype(_numpy_dtype(self.kinds["movie"])),
            trainable=False,
            name="movie_tokens",
        )
        self.missing_movie = missing

    @staticmethod
    def _to_index(vocabulary):
        import tensorflow as tf

        keys = np.asarray(vocabulary.tokens).astype(_numpy_dtype(vocabulary.kind))
        init = tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys, dtype=tf_dtype(vocabulary.kind)),
            tf.range(1, vocabulary.size + 1, dtype=tf.int64),
        )
        return tf.lookup.StaticHashTable(init, default_value=0)

    def users(self, raw):
        import tensorflow as tf

        return tf.cast(self.module.users.lookup(raw), tf.int32)

    def movies(self, raw):
        import tensorflow as tf

        return tf.cast(self.module.movies.lookup(raw), tf.int32)

    def raw_movies(self, indices):
        """Indices ([batch, k], NO_MOVIE where none) -> raw ids (missing: -1 or "")."""
        import tensorflow as tf

        safe = tf.maximum(indices, 0)
        raw = tf.gather(self.module.movie_tokens, safe)
        missing = tf.constant(self.missing_movie, dtype=self.module.movie_tokens.dtype)
        return tf.where(indices > 0, raw, tf.fill(tf.shape(raw), missing))


def tf_dtype(kind: str):
    import tensorflow as tf

    return tf.int64 if kind == INT64 else tf.string


def _numpy_dtype(kind: str):
    return np.int64 if kind == INT64 else object


def _batch_of_ids(ids, name: str):
    import tensorflow as tf

    ids = tf.convert_to_tensor(ids)
    check = tf.debugging.assert_rank(ids, 1, message=f"{name} must be a 1-D batch of ids")
    with tf.control_dependencies([check]):
        return tf.identity(ids)


def build_export_archive(
    model,
    seen,
    vocabularies,
    stars_range: tuple[float, float] = F.DEFAULT_STARS_RANGE,
    explicit: bool = True,
):
    """The serving signatures over a trained `Recommender`, its table of rated movies and the
    vocabularies: clients send and receive raw ids. `stars` outputs are on the data set's own
    scale; implicit-feedback models (`explicit` False) have no `rank` signature."""
    import keras
    import tensorflow as tf

    from components.training.layers import NO_MOVIE

    model.index_candidates()
    lookups = IdLookups(vocabularies)
    archive = keras.export.ExportArchive()
    archive.track(model)
    if model.fused_rating_head is not None:
        archive.track(model.fused_rating_head)
    archive.track(seen)
    archive.track(lookups.module)

    def users_in(raw):
        index = lookups.users(_batch_of_ids(raw, F.USER_ID))
        return index, tf.equal(index, 0)

    def out(scores, ids, cold):
        return {
            F.OUT_MOVIE_IDS: lookups.raw_movies(ids),
            F.OUT_SCORES: scores,
            F.OUT_COLD_START: cold,
        }

    def retrieve(user_id):
        user, cold = users_in(user_id)
        scores, ids = model.recommend(user, seen=seen, cold=cold)
        return out(scores, ids, cold)

    def retrieve_excluding(user_id, excluded_movie_ids):
        user, cold = users_in(user_id)
        same_batch = tf.debugging.assert_equal(
            tf.shape(user_id)[0],
            tf.shape(excluded_movie_ids)[0],
            message="user_id and excluded_movie_ids must have the same batch size",
        )
        with tf.control_dependencies([same_batch]):
            excluded = lookups.movies(excluded_movie_ids)  # unknown ids and padding: 0, no-op
        scores, ids = model.recommend(user, excluded_movie_ids=excluded, cold=cold)
        return out(scores, ids, cold)

    def rank(user_id, movie_id):
        user, _ = users_in(user_id)
        movie_id = _batch_of_ids(movie_id, F.MOVIE_ID)
        movie = lookups.movies(movie_id)
        known = movie > 0
        checks = [
            tf.debugging.assert_equal(
                tf.shape(user_id),
                tf.shape(movie_id),
                message="user_id and movie_id must have the same length",
            ),
            tf.debugging.Assert(
                tf.reduce_all(known),
                [
                    "unknown movie_id (not in the model's vocabulary):",
                    tf.boolean_mask(movie_id, ~known),
                ],
                summarize=10,
            ),
        ]
        with tf.control_dependencies(checks):
            rating = model.predict_rating(user, tf.identity(movie))
        return {F.OUT_RATING: rating, F.OUT_STARS: F.denormalise_rating(rating, stars_range)}

    def retrieve_k(user_id, k):
        user, cold = users_in(user_id)
        message = f"k must be in 1..{F.MAX_REQUEST_K}"
        checks = [
            tf.debugging.assert_greater_equal(k, 1, message=message),
            tf.debugging.assert_less_equal(k, F.MAX_REQUEST_K, message=message),
        ]
        with tf.control_dependencies(checks):
            k = tf.identity(k)
        widest = min(F.MAX_REQUEST_K, len(model.candidate_ids))  # static: top-k sorts
        scores, ids = model.recommend(user, k=widest, seen=seen, cold=cold)
        taken = tf.minimum(k, widest)
        padding = [[0, 0], [0, k - taken]]
        return out(
            tf.pad(scores[:, :taken], padding, constant_values=float("-inf")),
            tf.pad(ids[:, :taken], padding, constant_values=NO_MOVIE),
            cold,
        )

    user_spec = tf.TensorSpec([None], tf_dtype(lookups.kinds["user"]), name=F.USER_ID)
    movie_dtype = tf_dtype(lookups.kinds["movie"])
    archive.add_endpoint(F.SIGNATURE_RETRIEVE, retrieve, input_signature=[user_spec])
    archive.add_endpoint(
        F.SIGNATURE_RETRIEVE_EXCLUDING,
        retrieve_excluding,
        input_signature=[
            user_spec,
            tf.TensorSpec([None, None], movie_dtype, name=F.EXCLUDED_MOVIE_IDS),
        ],
    )
    if explicit:
        archive.add_endpoint(
            F.SIGNATURE_RANK,
            rank,
            input_signature=[user_spec, tf.TensorSpec([None], movie_dtype, name=F.MOVIE_ID)],
        )
    archive.add_endpoint(
        F.SIGNATURE_RETRIEVE_K,
        retrieve_k,
        input_signature=[user_spec, tf.TensorSpec([], tf.int32, name=F.K)],
    )
    return archive


def signatures_of(explicit: bool) -> tuple[str, ...]:
    return tuple(s for s in SIGNATURES if explicit or s != F.SIGNATURE_RANK)


def warmup_inputs(vocabularies, explicit: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """A small, valid request per signature (TF Serving replays them before serving), in raw
    ids of the vocabularies."""

    def first(vocabulary) -> np.ndarray:
        tokens = vocabulary.tokens[np.arange(WARMUP_USERS) % vocabulary.size]
        return np.asarray(tokens).astype(_numpy_dtype(vocabulary.kind))

    users, movies = first(vocabularies.users), first(vocabularies.movies)
    padding = np.full_like(movies, vocabularies.movies.missing)
    inputs = {
        F.SIGNATURE_RETRIEVE: {F.USER_ID: users},
        F.SIGNATURE_RETRIEVE_EXCLUDING: {
            F.USER_ID: users,
            F.EXCLUDED_MOVIE_IDS: np.stack([movies, padding], axis=1),
        },
        F.SIGNATURE_RANK: {F.USER_ID: users, F.MOVIE_ID: movies},
        F.SIGNATURE_RETRIEVE_K: {F.USER_ID: users, F.K: np.int32(WARMUP_K)},
    }
    return {name: inputs[name] for name in signatures_of(explicit)}


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
    vocabularies,
    path: str,
    history: dict[str, list[float]],
    metadata: dict[str, Any],
    model_name: str = F.DEFAULT_MODEL_NAME,
) -> str:
    """Write the SavedModel, its metadata, history and warmup requests into `path` (a staging
    folder: the caller publishes it atomically)."""
    stars_range = tuple(metadata.get("stars_range", F.DEFAULT_STARS_RANGE))
    explicit = bool(metadata.get("explicit", True))
    build_export_archive(model, seen, vocabularies, stars_range, explicit).write_out(
        path, verbose=False
    )
    extra = os.path.join(path, METADATA_DIR)
    os.makedirs(extra, exist_ok=True)
    info = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_users": model.num_users,
        "num_movies": model.num_movies,
        "id_kinds": {"user": vocabularies.users.kind, "movie": vocabularies.movies.kind},
        "k": model.config.top_k,
        "signatures": list(signatures_of(explicit)),
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
        warmup_inputs(vocabularies, explicit),
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
    evaluation scores the candidate and the previously blessed model with this one class.

    Evaluation works in the vocabulary indices of its examples; `vocabularies` (those of the
    examples) turn them into the raw ids the signatures take and back, so a previous model
    trained on other data (another vocabulary) is scored on the same footing."""

    def __init__(self, path: str, vocabularies):
        import tensorflow as tf

        self.path = path
        self.info = read_metadata(path)
        self.k = int(self.info["k"])
        self.vocabularies = vocabularies
        loaded = tf.saved_model.load(path)
        self._loaded = loaded  # keeps the signatures' variables alive
        self._retrieve = loaded.signatures[F.SIGNATURE_RETRIEVE_EXCLUDING]
        self._rank = loaded.signatures.get(F.SIGNATURE_RANK)
        self._check_kinds()

    @property
    def rates(self) -> bool:
        """Whether the model predicts ratings (implicit-feedback models do not)."""
        return self._rank is not None

    def _check_kinds(self) -> None:
        spec = self._retrieve.structured_input_signature[1][F.USER_ID]
        want = self.vocabularies.users.kind
        if (spec.dtype.name == "string") != (want != INT64):
            raise DataError(
                f"{self.path}: the model takes {spec.dtype.name} user ids and the examples hold "
                f"{want} ids: it was trained on other data"
            )

    def _raw_users(self, users: np.ndarray) -> np.ndarray:
        return self.vocabularies.users.raw(users).astype(_numpy_dtype(self.vocabularies.users.kind))

    def _raw_movies(self, movies: np.ndarray) -> np.ndarray:
        vocab = self.vocabularies.movies
        return vocab.raw(movies).astype(_numpy_dtype(vocab.kind))

    def top_k(self, users: np.ndarray, excluded: list[np.ndarray] | None = None) -> np.ndarray:
        """[len(users), k] movie indices (-1 where fewer remain, or where the model answered a
        movie outside the examples' vocabulary); `excluded[i]` are the movie indices to skip for
        users[i] (e.g. the movies rated in training)."""
        import tensorflow as tf

        users = np.asarray(users, dtype=np.int64)
        out = np.full((len(users), self.k), -1, dtype=np.int32)
        for start in range(0, len(users), SCORING_BATCH):
            batch = users[start : start + SCORING_BATCH]
            rows = excluded[start : start + len(batch)] if excluded is not None else []
            width = max((len(r) for r in rows), default=0) or 1
            dense = np.zeros((len(batch), width), dtype=np.int64)
            for i, row in enumerate(rows):
                dense[i, : len(row)] = row
            result = self._retrieve(
                user_id=tf.constant(self._raw_users(batch)),
                excluded_movie_ids=tf.constant(self._raw_movies(dense)),
            )
            raw = result[F.OUT_MOVIE_IDS].numpy()
            if raw.dtype == object:
                raw = np.vectorize(bytes.decode, otypes=[object])(raw) if raw.size else raw
            index = self.vocabularies.movies.lookup(raw)
            missing = raw == self.vocabularies.movies.missing
            out[start : start + len(batch)] = np.where((index == 0) | missing, -1, index)
        return out

    def predict_rating(self, users: np.ndarray, movies: np.ndarray) -> np.ndarray:
        """Normalised ratings in [0, 1] through the `rank` signature (known movies only)."""
        import tensorflow as tf

        out = np.zeros(len(users), dtype=np.float32)
        for start in range(0, len(users), 65_536):
            stop = start + 65_536
            out[start:stop] = self._rank(
                user_id=tf.constant(self._raw_users(np.asarray(users[start:stop]))),
                movie_id=tf.constant(self._raw_movies(np.asarray(movies[start:stop]))),
            )[F.OUT_RATING].numpy()
        return out


def export_saved_model(
    model,
    seen,
    vocabularies,
    base_dir: str,
    model_name: str = F.DEFAULT_MODEL_NAME,
    version: int | None = None,
) -> str:
    """Write a SavedModel straight into a local TF Serving layout, `<base>/<name>/<version>/`
    (tests and benchmarks; a pipeline pushes the trained artifact with `components.push.pusher`)."""
    from components.artifacts.model_versions import list_versions
    from components.storage import atomic_output_dir

    model_dir = os.path.join(base_dir, model_name)
    if version is None:
        existing = list_versions(model_dir)
        version = existing[-1] + 1 if existing else 1
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise DataError(f"{final} already exists: versions are never overwritten")
    with atomic_output_dir(final) as staging:
        write_saved_model(model, seen, vocabularies, staging, {}, {}, model_name)
    return final
