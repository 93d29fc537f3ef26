"""Stage 5, export: a blessed model as a SavedModel in TF Serving's layout.

`<base>/<model_name>/<version>/{saved_model.pb, variables/, assets.extra/mtrec.json}`, integer
versions, written to a hidden temporary folder and renamed into place, so a server polling the
base path never sees half a model. Signatures (names in `features`):
- `serving_default`: user_id -> top-k movie_ids, scores, skipping every movie the user rated in
  the data the pipeline ingested (the export carries that table);
- `retrieve_excluding`: user_id, excluded_movie_ids -> top-k, skipping only the ids given;
- `rank`: user_id, movie_id -> rating in [0, 1] and stars in [1, 5];
- `retrieve_k`: user_id, scalar k (1..MAX_REQUEST_K) -> top-k as `serving_default`, k columns
  (padded with -1 / -inf past the number of candidates).
"""

import json
import logging
import os
import shutil
import time
import uuid

import keras
import numpy as np
import tensorflow as tf
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import features as F
from components.errors import GateError
from components.layout import METADATA_DIR, METADATA_FILE, list_versions
from components.model import NO_MOVIE, Recommender, SeenMovies

log = logging.getLogger(__name__)

BLESSING_FILE = "blessing.json"


def _check_ids(ids, upper: int, name: str):
    """Reject ids outside the embedding tables with a message naming the input; the checks run
    before any lookup uses the ids (on a GPU an out-of-range gather would silently give zeros)."""
    ids = tf.convert_to_tensor(ids)
    message = f"unknown {name}: ids must be in 1..{upper - 1}"
    checks = [
        tf.debugging.assert_rank(ids, 1, message=f"{name} must be a 1-D batch of ids"),
        tf.debugging.assert_greater_equal(ids, 1, message=message),
        tf.debugging.assert_less(ids, upper, message=message),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(ids)


def build_export_archive(model: Recommender, seen: SeenMovies) -> keras.export.ExportArchive:
    """The serving signatures over a trained model and the table of rated movies."""
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
        return {F.OUT_RATING: rating, F.OUT_STARS: F.denormalise_rating(rating)}

    def retrieve_k(user_id, k):
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


def export_saved_model(
    model: Recommender,
    seen: SeenMovies,
    base_dir: str,
    model_name: str,
    version: int | None = None,
    metadata: dict | None = None,
) -> str:
    """Write a new version atomically; returns its path. Version defaults to latest + 1."""
    model_dir = os.path.join(base_dir, model_name)
    os.makedirs(model_dir, exist_ok=True)
    if version is None:
        existing = list_versions(model_dir)
        version = existing[-1] + 1 if existing else 1
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise GateError(f"{final} already exists: versions are never overwritten")
    staging = os.path.join(model_dir, f".staging-{version}-{uuid.uuid4().hex[:8]}")
    try:
        build_export_archive(model, seen).write_out(staging, verbose=False)
        os.makedirs(os.path.join(staging, METADATA_DIR), exist_ok=True)
        info = {
            "model_name": model_name,
            "version": version,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "num_users": model.num_users,
            "num_movies": model.num_movies,
            "k": model.config.top_k,
            "signatures": [
                F.SIGNATURE_RETRIEVE,
                F.SIGNATURE_RETRIEVE_EXCLUDING,
                F.SIGNATURE_RANK,
                F.SIGNATURE_RETRIEVE_K,
            ],
            **(metadata or {}),
        }
        with open(os.path.join(staging, METADATA_DIR, METADATA_FILE), "w", encoding="utf-8") as out:
            json.dump(info, out, indent=2)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s", final)
    return final


def read_blessing(blessing_dir: str) -> dict:
    path = os.path.join(blessing_dir, BLESSING_FILE)
    if not os.path.isfile(path):
        raise GateError(f"{path}: not found (expected an evaluation blessing)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def run_export(
    model_dir: str,
    examples_dir: str,
    blessing_dir: str,
    base_dir: str,
    model_name: str,
    version: int | None = None,
) -> str:
    """Export a blessed model; refuses an unblessed one (the DAG's condition is the first guard)."""
    from components.dataset import load_columns

    blessing = read_blessing(blessing_dir)
    if not blessing.get("blessed"):
        failed = [g["name"] for g in blessing.get("gates", []) if not g.get("passed")]
        raise GateError(f"the model is not blessed (failed gates: {', '.join(failed) or '?'})")
    model = Recommender.load_artifact(model_dir)
    columns = [load_columns(examples_dir, split) for split in (F.TRAIN_SPLIT, F.TEST_SPLIT)]
    seen = SeenMovies(
        np.concatenate([c[F.USER_ID] for c in columns]),
        np.concatenate([c[F.MOVIE_ID] for c in columns]),
        model.num_users,
    )
    return export_saved_model(
        model,
        seen,
        base_dir,
        model_name,
        version,
        metadata={"metrics": blessing.get("metrics", {})},
    )


# --- KFP component ---


def export_op(
    model: Input[Model],
    examples: Input[Dataset],
    blessing: Input[Artifact],
    serving_model_dir: str,
    model_name: str,
    pushed_model: Output[Model],
):
    """Export the blessed model to `<serving_model_dir>/<model_name>/<version>/`."""
    import logging

    from components.errors import exit_on_error
    from components.export import run_export

    logging.basicConfig(level=logging.INFO)
    with exit_on_error():
        path = run_export(model.path, examples.path, blessing.path, serving_model_dir, model_name)
        pushed_model.uri = path
        pushed_model.metadata.update(
            {"pushed_destination": path, "version": int(path.rsplit("/", 1)[-1])}
        )
