"""TF Serving's export layout, shared by the exporter, the evaluator and the server.

`<base>/<model_name>/<integer version>/{saved_model.pb, variables/, assets.extra/mtrec.json}`.
Kept free of TensorFlow, Keras and KFP imports so the server and the client stay light.
"""

import os
import re

SAVED_MODEL_FILE = "saved_model.pb"
METADATA_DIR = "assets.extra"  # TF Serving ignores it; it is part of the SavedModel folder
METADATA_FILE = "mtrec.json"
_VERSION_DIR = re.compile(r"^\d+$")


def list_versions(model_dir: str) -> list[int]:
    """Integer version folders holding a saved_model.pb, ascending. Other entries (an export's
    hidden staging folder, non-integer names) are ignored, as TF Serving does."""
    try:
        names = os.listdir(model_dir)
    except OSError:
        return []
    return sorted(
        int(name)
        for name in names
        if _VERSION_DIR.match(name)
        and os.path.isfile(os.path.join(model_dir, name, SAVED_MODEL_FILE))
    )


def latest_version_path(base_dir: str, model_name: str) -> str | None:
    model_dir = os.path.join(base_dir, model_name)
    versions = list_versions(model_dir)
    return os.path.join(model_dir, str(versions[-1])) if versions else None


def metadata_path(version_dir: str) -> str:
    return os.path.join(version_dir, METADATA_DIR, METADATA_FILE)
