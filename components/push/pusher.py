"""Stage 6, push (TFX's Pusher): copy exactly the evaluated, blessed, infra-validated SavedModel
to `<serving_model_dir>/<model_name>/<version>/`, locally or on s3:// / gs://.

A poller (TF Serving, `mtrec serve`) must never see a loadable partial version:
- locally the copy is written to a hidden staging folder and renamed into place (atomic);
- on object stores there is no rename, so the writes are ordered: every file first, then
  `saved_model.pb`, the one file a server needs to consider a version at all. A push killed
  part-way leaves a version folder without `saved_model.pb`: never loadable.
Versions are claimed before anything is written, with an exclusive create (O_EXCL locally, a
conditional PUT `If-None-Match: *` on S3), so concurrent pushes get distinct versions and no
version is ever overwritten. Each push first removes what killed pushes left behind: claims and
partial folders whose owner is gone (same host, dead pid) or older than `STALE_SECONDS`.
"""

import json
import logging
import os
import shutil
import socket
import time
import uuid
from typing import Any

from components import features as F
from components import storage
from components.artifacts.model_versions import (
    MAX_VERSION,
    SAVED_MODEL_FILE,
    is_version_name,
    list_versions,
)
from components.artifacts.saved_model import check_model_dir
from components.errors import DataError, GateError

log = logging.getLogger(__name__)

CLAIM_PREFIX = ".claim-"  # .claim-<version>: who is writing that version
STAGING_PREFIX = ".staging-"  # local only: .staging-<version>-<id>, renamed to <version>
STALE_SECONDS = 3600  # a claim this old whose owner cannot be checked is a leftover
MAX_CLAIM_ATTEMPTS = 100


def check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or not 0 < version <= MAX_VERSION:
        raise DataError(
            f"version must be an integer in 1..{MAX_VERSION} (TF Serving's int64 versions), "
            f"got {version!r}"
        )
    return version


def _read_verdict(folder: str, name: str, what: str) -> dict[str, Any]:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise GateError(f"{path}: not found (expected the {what} output)")
    with open(path, encoding="utf-8") as handle:
        verdict = json.load(handle)
    if verdict.get("blessed") is not True:
        failed = [
            g["name"]
            for g in verdict.get("gates", verdict.get("checks", []))
            if not g.get("passed")
        ]
        raise GateError(f"the model is not {what}-blessed (failed: {', '.join(failed) or '?'})")
    return verdict


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def _owner_gone(owner: dict[str, Any]) -> bool:
    """True when the push that wrote this claim cannot still be running."""
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner.get("pid", 0)), 0)
        except (ProcessLookupError, ValueError):
            return True
        except PermissionError:
            return False
        return False
    return time.time() - float(owner.get("time", 0)) > STALE_SECONDS


def _read_owner(path: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_bytes(path))
    except (FileNotFoundError, ValueError, OSError):
        return {}


def _create_exclusive(path: str, payload: bytes) -> bool:
    """Create `path` only if it does not exist; False when it already does."""
    if not storage.is_remote(path):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        return True
    fs, inner = storage.filesystem(path)
    try:
        fs.pipe_file(inner, payload, mode="create")
    except TypeError:  # a filesystem without conditional writes: check, then write
        if fs.exists(inner):
            return False
        fs.pipe_file(inner, payload)
    except (FileExistsError, OSError) as err:
        if isinstance(err, FileExistsError) or "precondition" in str(err).lower():
            return False
        raise
    return True


def clean_leftovers(model_dir: str) -> list[str]:
    """Remove the claims, staging folders and partial versions of pushes that died."""
    removed = []
    names = storage.listdir(model_dir)
    complete = set(list_versions(model_dir))
    for name in names:
        if not name.startswith(CLAIM_PREFIX):
            continue
        claim = storage.join(model_dir, name)
        if not _owner_gone(_read_owner(claim)):
            continue
        version = name[len(CLAIM_PREFIX) :]
        if version in names and version.isdigit() and int(version) not in complete:
            storage.remove(storage.join(model_dir, version))
            removed.append(version)
        storage.remove(claim)
        removed.append(name)
    for name in names:
        if name.startswith(STAGING_PREFIX):
            parts = name.split("-")
            claim = f"{CLAIM_PREFIX}{parts[1]}" if len(parts) > 2 else ""
            if claim not in names or name in removed or claim in removed:
                storage.remove(storage.join(model_dir, name))
                removed.append(name)
    if removed:
        log.info("removed leftovers of killed pushes in %s: %s", model_dir, ", ".join(removed))
    return removed


def claim_version(model_dir: str, version: int | None = None) -> int:
    """Reserve a version number no other push can get: `version` if given (refused when taken),
    else one above every version, claim or partial folder present."""
    if version is not None:
        check_version(version)
    for _ in range(MAX_CLAIM_ATTEMPTS):
        names = storage.listdir(model_dir)
        taken = {int(n) for n in names if is_version_name(n)}
        taken |= {
            int(n[len(CLAIM_PREFIX) :])
            for n in names
            if n.startswith(CLAIM_PREFIX) and is_version_name(n[len(CLAIM_PREFIX) :])
        }
        if version is not None and version in taken:
            raise GateError(
                f"{storage.join(model_dir, str(version))} already exists: versions are never "
                "overwritten"
            )
        candidate = version if version is not None else max(taken, default=0) + 1
        check_version(candidate)
        claim = storage.join(model_dir, f"{CLAIM_PREFIX}{candidate}")
        if _create_exclusive(claim, json.dumps(_owner()).encode()):
            return candidate
        if version is not None:
            raise GateError(f"version {version} is being pushed by another run")
    raise GateError(f"could not claim a version in {model_dir} after {MAX_CLAIM_ATTEMPTS} tries")


def _copy_files(source: str, target: str) -> None:
    """Every file of `source` into `target`, `saved_model.pb` last."""
    storage.upload_dir(source, target, last=SAVED_MODEL_FILE)


def _copy_local(source: str, model_dir: str, version: int) -> str:
    final = os.path.join(model_dir, str(version))
    staging = os.path.join(model_dir, f"{STAGING_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
    try:
        _copy_files(source, staging)
        os.rename(staging, final)  # final never exists: the claim reserved the name
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _copy_remote(source: str, model_dir: str, version: int) -> str:
    final = storage.join(model_dir, str(version))
    _copy_files(source, final)
    return final


def push(
    model_dir: str,
    blessing_dir: str,
    infra_blessing_dir: str,
    serving_model_dir: str,
    model_name: str = F.DEFAULT_MODEL_NAME,
    version: int | None = None,
) -> str:
    """Push a blessed, infra-validated SavedModel; returns the new version's path."""
    _read_verdict(blessing_dir, F.BLESSING_FILE, "evaluation")
    _read_verdict(infra_blessing_dir, F.INFRA_BLESSING_FILE, "infra-validation")
    check_model_dir(model_dir)
    target = storage.join(serving_model_dir, model_name)
    if not storage.is_remote(target):
        os.makedirs(target, exist_ok=True)
    clean_leftovers(target)
    claimed = claim_version(target, version)
    claim = storage.join(target, f"{CLAIM_PREFIX}{claimed}")
    if storage.is_remote(target):
        final = _copy_remote(model_dir, target, claimed)
    else:
        final = _copy_local(model_dir, target, claimed)
    storage.remove(claim)
    log.info("pushed %s", final)
    return final
