"""The pusher: exact copies, never-overwritten int64 versions, concurrent pushes, killed pushes.

Locally and against moto's S3 server on loopback. A "killed push" is a real process killed with
SIGKILL after its n-th file, for every n, so every point of the copy is covered.
"""

import json
import multiprocessing
import os
import signal
import time

import pytest

from components import features as F
from components import storage
from components.artifacts.model_versions import MAX_VERSION, SAVED_MODEL_FILE, list_versions
from components.errors import DataError, GateError
from components.push.pusher import CLAIM_PREFIX, claim_version, push


def _verdict(folder, name, blessed=True):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as handle:
        json.dump({"blessed": blessed, "gates": [{"name": "rmse", "passed": blessed}]}, handle)
    return str(folder)


@pytest.fixture
def blessings(tmp_path):
    return (
        _verdict(tmp_path / "blessing", F.BLESSING_FILE),
        _verdict(tmp_path / "infra", F.INFRA_BLESSING_FILE),
    )


def _files(root: str) -> dict[str, bytes]:
    if storage.is_remote(root):
        fs, inner = storage.filesystem(root)
        fs.invalidate_cache()
        return {p[len(inner) + 1 :]: fs.cat_file(p) for p in fs.find(inner)}
    return {
        rel: open(os.path.join(root, rel), "rb").read()  # noqa: SIM115
        for rel in storage.local_files(root)
    }


def _assert_every_version_is_complete(model_dir: str, source: str) -> list[int]:
    """What a poller would load: every version with saved_model.pb is a byte-exact copy."""
    expected = _files(source)
    versions = list_versions(model_dir)
    for version in versions:
        assert _files(storage.join(model_dir, str(version))) == expected, version
    return versions


@pytest.mark.parametrize("where", ["local", "s3"])
def test_push_copies_exactly_and_never_overwrites(
    where, request, tmp_path, small_saved_model, blessings
):
    base = (
        str(tmp_path / "serving")
        if where == "local"
        else request.getfixturevalue("s3_bucket") + "/models"
    )
    first = push(small_saved_model, *blessings, base, "m")
    second = push(small_saved_model, *blessings, base, "m")
    assert [storage.basename(first), storage.basename(second)] == ["1", "2"]
    assert _assert_every_version_is_complete(storage.join(base, "m"), small_saved_model) == [1, 2]
    with pytest.raises(GateError, match="never overwritten"):
        push(small_saved_model, *blessings, base, "m", version=2)
    assert storage.basename(
        push(small_saved_model, *blessings, base, "m", version=MAX_VERSION)
    ) == str(MAX_VERSION)
    assert not [n for n in storage.listdir(storage.join(base, "m")) if n.startswith(".")]


@pytest.mark.parametrize("version", [0, -1, MAX_VERSION + 1, 10**20])
def test_versions_are_positive_and_fit_int64(tmp_path, small_saved_model, blessings, version):
    with pytest.raises(DataError, match="version must be an integer in 1.."):
        push(small_saved_model, *blessings, str(tmp_path), "m", version=version)
    assert not (tmp_path / "m" / str(version)).exists()


def test_push_refuses_unblessed_or_not_infra_validated(tmp_path, small_saved_model, blessings):
    unblessed = _verdict(tmp_path / "no", F.BLESSING_FILE, blessed=False)
    with pytest.raises(GateError, match=r"not evaluation-blessed \(failed: rmse\)"):
        push(small_saved_model, unblessed, blessings[1], str(tmp_path / "s"), "m")
    with pytest.raises(GateError, match="infra_blessing.json: not found"):
        push(small_saved_model, blessings[0], str(tmp_path / "none"), str(tmp_path / "s"), "m")
    assert list_versions(str(tmp_path / "s" / "m")) == []


def _claim_many(model_dir: str, count: int, queue) -> None:
    queue.put([claim_version(model_dir) for _ in range(count)])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_claims_get_distinct_versions(where, request, tmp_path):
    model_dir = (
        str(tmp_path / "m") if where == "local" else request.getfixturevalue("s3_bucket") + "/m"
    )
    if where == "local":
        os.makedirs(model_dir)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_claim_many, args=(model_dir, 5, queue)) for _ in range(3)]
    for worker in workers:
        worker.start()
    claimed = [v for _ in workers for v in queue.get(timeout=120)]
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(claimed) == list(range(1, 16))


def _push_then_die(after_files: int, args: tuple) -> None:
    """A push whose process is SIGKILLed right after its n-th file is written."""
    from components import storage
    from components.push import pusher

    real = storage.upload_file
    written = []

    def upload_then_maybe_die(local, remote):
        real(local, remote)
        written.append(remote)
        if len(written) >= after_files:
            os.kill(os.getpid(), signal.SIGKILL)

    pusher.storage.upload_file = upload_then_maybe_die
    pusher.push(*args)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_killed_push_never_yields_a_loadable_partial_version(
    where, request, tmp_path, small_saved_model, blessings
):
    base = (
        str(tmp_path / "serving")
        if where == "local"
        else request.getfixturevalue("s3_bucket") + "/models"
    )
    model_dir = storage.join(base, "m")
    files = len(storage.local_files(small_saved_model))
    context = multiprocessing.get_context("spawn")
    for after in range(1, files + 1):
        process = context.Process(
            target=_push_then_die, args=(after, (small_saved_model, *blessings, base, "m"))
        )
        process.start()
        process.join(timeout=120)
        assert process.exitcode == -signal.SIGKILL
        versions = _assert_every_version_is_complete(model_dir, small_saved_model)
        # On S3 only the last file (saved_model.pb) completes a version; locally nothing is
        # visible before the rename that follows the last file.
        complete = where == "s3" and after == files
        assert versions == ([1] if complete else []), after
    # The next push cleans what the killed ones left, and gets a fresh version.
    pushed = push(small_saved_model, *blessings, base, "m")
    assert _assert_every_version_is_complete(model_dir, small_saved_model)[-1] == int(
        storage.basename(pushed)
    )
    leftovers = [n for n in storage.listdir(model_dir) if n.startswith((CLAIM_PREFIX, ".staging"))]
    assert leftovers == []
    partial = [
        n
        for n in storage.listdir(model_dir)
        if n.isdigit() and int(n) not in list_versions(model_dir)
    ]
    assert partial == []


def test_a_live_push_is_not_cleaned(tmp_path):
    """A claim whose owner is alive (this process) is kept by another push's cleanup."""
    from components.push.pusher import clean_leftovers

    model_dir = str(tmp_path / "m")
    os.makedirs(model_dir)
    version = claim_version(model_dir)
    os.makedirs(os.path.join(model_dir, f".staging-{version}-abc"))
    assert clean_leftovers(model_dir) == []
    assert f"{CLAIM_PREFIX}{version}" in os.listdir(model_dir)
    # Same host, a pid that no longer exists: a leftover.
    with open(os.path.join(model_dir, f"{CLAIM_PREFIX}{version}"), "w") as handle:
        json.dump({"host": os.uname().nodename, "pid": 2**22 + 12345, "time": time.time()}, handle)
    assert set(clean_leftovers(model_dir)) == {
        f"{CLAIM_PREFIX}{version}",
        f".staging-{version}-abc",
    }
    assert SAVED_MODEL_FILE not in os.listdir(model_dir)
