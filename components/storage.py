"""One filesystem layer for local paths, `s3://` and `gs://` URIs (fsspec with s3fs / gcsfs).

Why fsspec and not tf.io.gfile: TensorFlow 2.21 dropped its S3 filesystem (it lives in
tensorflow-io), and the stages that read data or push models (ingestion, evaluation's previous
model, the pusher, `mtrec serve`) should not import TensorFlow just to copy files. Credentials
come from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
GOOGLE_APPLICATION_CREDENTIALS, ...), never from the pipeline's parameters.

Also here: `atomic_output_dir`, how every stage publishes a local output folder (the artifact
path KFP hands it) so that a killed or failed stage never leaves something a later stage could
mistake for its input.
"""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

from components.errors import DataError

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")
PARTIAL_SUFFIX = ".partial-"  # <output>.partial-<id>: a stage's output while it is written


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a local path or a URI."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as err:
        raise DataError(f"{path}: cannot open this location ({err})") from None


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def listdir(path: str) -> list[str]:
    """Names of the entries directly under `path` (empty when it does not exist)."""
    fs, inner = filesystem(path)
    try:
        entries = (
            fs.ls(inner, detail=False, refresh=True)
            if is_remote(path)
            else fs.ls(inner, detail=False)
        )
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted({basename(entry) for entry in entries if basename(entry)})


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    if is_remote(path):
        fs.invalidate_cache()
    return bool(fs.exists(inner))


def isfile(path: str) -> bool:
    fs, inner = filesystem(path)
    if is_remote(path):
        fs.invalidate_cache()
    return bool(fs.isfile(inner))


def read_json(path: str, expected: str) -> Any:
    """A local JSON file an earlier stage wrote; a DataError naming the file and the `expected`
    output when it is missing."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found (expected {expected})")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    return fs.cat_file(inner)


def write_bytes(path: str, data: bytes) -> None:
    """Write one object/file whole: on object stores a PUT is atomic; locally via a rename."""
    if is_remote(path):
        fs, inner = filesystem(path)
        fs.pipe_file(inner, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}{PARTIAL_SUFFIX}{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def remove(path: str) -> None:
    """Delete a file or a folder tree; missing is fine."""
    if is_remote(path):
        fs, inner = filesystem(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(inner, recursive=True)
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def local_files(folder: str) -> list[str]:
    """Every file under a local folder, as paths relative to it, sorted."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


def upload_file(local: str, remote: str) -> None:
    fs, inner = filesystem(remote)
    if is_remote(remote):
        fs.put_file(local, inner)
    else:
        os.makedirs(os.path.dirname(remote), exist_ok=True)
        shutil.copyfile(local, remote)


def upload_dir(local: str, target: str, last: str | None = None) -> None:
    """Every file of a local folder into `target` (any location); `last` (a relative path, e.g.
    saved_model.pb) is copied after the others, so a reader that waits for it sees a whole
    folder."""
    files = local_files(local)
    ordered = [f for f in files if f != last] + ([last] if last in files else [])
    for relative in ordered:
        upload_file(os.path.join(local, relative), join(target, *relative.split(os.sep)))


def download_file(remote: str, local: str) -> None:
    fs, inner = filesystem(remote)
    fs.get_file(inner, local)


def download_dir(remote: str, local: str) -> str:
    """Copy a folder from any location into a local folder (which must not exist yet)."""
    if not is_remote(remote):
        shutil.copytree(remote, local)
        return local
    fs, inner = filesystem(remote)
    fs.invalidate_cache()
    os.makedirs(local)
    prefix = inner.rstrip("/") + "/"
    for path in fs.find(inner):
        relative = path[len(prefix) :]
        target = os.path.join(local, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(path, target)
    return local


@contextlib.contextmanager
def local_copy(path: str, workdir: str) -> Iterator[str]:
    """A local path for `path`: itself when local, else a downloaded copy under `workdir`."""
    if not is_remote(path):
        yield path
        return
    target = os.path.join(workdir, f"download-{uuid.uuid4().hex[:8]}")
    try:
        yield download_dir(path, target)
    finally:
        shutil.rmtree(target, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(path: str) -> Iterator[str]:
    """Yield a staging folder that becomes `path` only if the block succeeds.

    Whatever `path` held before (an earlier run's output) is removed first: a failed or killed
    run leaves no output at `path` that a later stage could take for its input, only a
    `<path>.partial-<id>` folder that nothing reads and the next run removes.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(path)
    for entry in os.listdir(parent):
        if entry.startswith(name + PARTIAL_SUFFIX):
            remove(os.path.join(parent, entry))
    remove(path)
    staging = f"{path}{PARTIAL_SUFFIX}{uuid.uuid4().hex[:8]}"
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    os.replace(staging, path)
