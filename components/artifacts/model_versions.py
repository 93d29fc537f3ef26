"""TF Serving's layout, shared by the pusher, the evaluator and the server.

`<base>/<model_name>/<integer version>/{saved_model.pb, variables/, assets.extra/...}`, where
`<base>` is a local path or an s3:// / gs:// URI. Free of TensorFlow, Keras and KFP imports:
the pusher and the server's version polling use it without loading a model.
"""

import os
import re

from components import storage

SAVED_MODEL_FILE = "saved_model.pb"
METADATA_DIR = "assets.extra"  # TF Serving ignores it; it is part of the SavedModel folder
METADATA_FILE = "mtrec.json"
WARMUP_FILE = "tf_serving_warmup_requests"  # under assets.extra/, as TF Serving reads it
_VERSION_DIR = re.compile(r"^[0-9]+$")
MAX_VERSION = 2**63 - 1  # TF Serving's versions are int64; 0 and below are never loaded


def list_versions(model_dir: str) -> list[int]:
    """Integer version folders holding a saved_model.pb, ascending. Other entries (an export's
    hidden staging folder, non-integer names) are ignored, as TF Serving does."""
    if storage.is_remote(model_dir):
        names = storage.listdir(model_dir)
        exists = storage.isfile
    else:
        try:
            names = os.listdir(model_dir)
        except OSError:
            return []
        exists = os.path.isfile
    return sorted(
        int(name)
        for name in names
        if is_version_name(name) and exists(storage.join(model_dir, name, SAVED_MODEL_FILE))
    )


def is_version_name(name: str) -> bool:
    return bool(_VERSION_DIR.match(name)) and 0 < int(name) <= MAX_VERSION


def latest_version_path(base_dir: str, model_name: str) -> str | None:
    model_dir = storage.join(base_dir, model_name)
    versions = list_versions(model_dir)
    return storage.join(model_dir, str(versions[-1])) if versions else None


def metadata_path(version_dir: str) -> str:
    return os.path.join(version_dir, METADATA_DIR, METADATA_FILE)
