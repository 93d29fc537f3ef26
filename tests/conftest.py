"""Shared fixtures: a small generated MovieLens-format data set and the real ML-100k when present."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_ML100K = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ml-100k")
)


def write_movielens(
    directory: str,
    users: int = 60,
    movies: int = 40,
    per_user: int = 25,
    seed: int = 0,
    layout: str = "ml-100k",
) -> str:
    """Write ratings and a catalogue in a MovieLens release's exact layout (ml-100k's u.data /
    u.item, ml-1m's ratings.dat / movies.dat, ml-25m's ratings.csv / movies.csv), with latent
    structure a model can learn. ml-25m's ratings are half stars, its titles quoted CSV."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    user_taste = rng.normal(size=(users + 1, 3))
    movie_traits = rng.normal(size=(movies + 1, 3))
    popularity = np.linspace(1.5, 0.2, movies)
    half = layout == "ml-25m"
    rows = []
    for user in range(1, users + 1):
        weights = popularity * np.exp(movie_traits[1:] @ user_taste[user] * 0.5)
        chosen = rng.choice(
            movies, size=min(per_user, movies), replace=False, p=weights / weights.sum()
        )
        for index in chosen:
            movie = int(index) + 1
            affinity = movie_traits[movie] @ user_taste[user]
            raw = 3 + affinity + rng.normal(scale=0.5)
            stars = (
                float(np.clip(np.round(raw * 2) / 2, 0.5, 5))
                if half
                else int(np.clip(np.round(raw), 1, 5))
            )
            rows.append((user, movie, stars, 874000000 + len(rows)))
    titles = [
        f"Movie {m}, The (199{m % 10})" if half else f"Movie {m} (199{m % 10})"
        for m in range(1, movies + 1)
    ]
    if layout == "ml-100k":
        with open(os.path.join(directory, "u.data"), "w", encoding="utf-8") as handle:
            handle.writelines(f"{u}\t{m}\t{s}\t{t}\n" for u, m, s, t in rows)
        with open(os.path.join(directory, "u.item"), "w", encoding="latin-1") as handle:
            for movie, title in enumerate(titles, start=1):
                handle.write(
                    f"{movie}|{title}|01-Jan-1995||http://example.invalid/{movie}"
                    + "|0" * 19
                    + "\n"
                )
    elif layout == "ml-1m":
        with open(os.path.join(directory, "ratings.dat"), "w", encoding="utf-8") as handle:
            handle.writelines(f"{u}::{m}::{s}::{t}\n" for u, m, s, t in rows)
        with open(os.path.join(directory, "movies.dat"), "w", encoding="latin-1") as handle:
            handle.writelines(f"{m}::{title}::Drama|Comédie\n" for m, title in enumerate(titles, 1))
    elif layout == "ml-25m":
        with open(os.path.join(directory, "ratings.csv"), "w", encoding="utf-8") as handle:
            handle.write("userId,movieId,rating,timestamp\n")
            handle.writelines(f"{u},{m},{s:.1f},{t}\n" for u, m, s, t in rows)
        with open(os.path.join(directory, "movies.csv"), "w", encoding="utf-8") as handle:
            handle.write("movieId,title,genres\n")
            handle.writelines(f'{m},"{title}",Drama|Comédie\n' for m, title in enumerate(titles, 1))
    else:
        raise ValueError(layout)
    return directory


def write_interactions(
    path: str,
    users: int = 60,
    movies: int = 40,
    per_user: int = 25,
    user_ids=lambda u: f"user-{u:04d}",
    item_ids=lambda m: f"sku/{m * 7919 % 10007}",
    rating: bool = True,
    timestamps: bool = True,
    items_path: str | None = None,
) -> str:
    """Your own logs, as a team would bring them: a CSV (or Parquet, by suffix) file with a
    header (user_id, item_id, rating, timestamp) and ids made by `user_ids` / `item_ids`; the
    same latent structure as `write_movielens`. `items_path`: a catalogue (item_id, title)."""
    source = write_movielens(
        os.path.join(os.path.dirname(path) or ".", ".interactions-source"), users, movies, per_user
    )
    with open(os.path.join(source, "u.data"), encoding="utf-8") as handle:
        rows = [line.split("\t") for line in handle]
    columns = {
        "user_id": [user_ids(int(r[0])) for r in rows],
        "item_id": [item_ids(int(r[1])) for r in rows],
    }
    if rating:
        columns["rating"] = [float(r[2]) for r in rows]
    if timestamps:
        columns["timestamp"] = [int(r[3]) for r in rows]
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)
    else:
        import csv

        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(list(columns))
            writer.writerows(zip(*columns.values(), strict=True))
    if items_path:
        with open(items_path, "w", encoding="utf-8", newline="") as handle:
            handle.write("item_id,title\n")
            handle.writelines(f'{item_ids(m)},"Item {m}, a title"\n' for m in range(1, movies + 1))
    return path


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory) -> str:
    return write_movielens(str(tmp_path_factory.mktemp("ml-small")))


@pytest.fixture(scope="session")
def ml100k_dir() -> str:
    """The real ML-100k from ../shared (CI has it); the tests that need it skip without it."""
    if not os.path.isfile(os.path.join(SHARED_ML100K, "u.data")):
        pytest.skip(f"the real MovieLens 100k is not at {SHARED_ML100K}")
    return SHARED_ML100K


@pytest.fixture(scope="session")
def ml100k_examples(tmp_path_factory, ml100k_dir) -> str:
    """Ingestion + Beam preprocessing of the real ML-100k, built once for the slow tests."""
    from components.config import PreprocessingConfig
    from components.ingestion.ingest import run_ingestion
    from components.preprocessing.pipeline import run_preprocessing

    root = tmp_path_factory.mktemp("ml100k-artifacts")
    ratings, movies, examples = (str(root / name) for name in ("ratings", "movies", "examples"))
    run_ingestion(ml100k_dir, ratings, movies)
    run_preprocessing(ratings, examples, PreprocessingConfig())
    return examples


@pytest.fixture(scope="session")
def small_examples(tmp_path_factory, small_data_dir) -> dict[str, str]:
    """Ingestion + Beam preprocessing outputs of the small data set (built once per session)."""
    from components.config import PreprocessingConfig
    from components.ingestion.ingest import run_ingestion
    from components.preprocessing.pipeline import run_preprocessing

    root = tmp_path_factory.mktemp("small-artifacts")
    ratings, movies, examples = (str(root / name) for name in ("ratings", "movies", "examples"))
    run_ingestion(small_data_dir, ratings, movies)
    run_preprocessing(ratings, examples, PreprocessingConfig())
    return {"ratings": ratings, "movies": movies, "examples": examples}


SMALL_TRAINING = {"epochs": 3, "batch_size": 128}


@pytest.fixture(scope="session")
def small_model(small_examples):
    """A model trained briefly on the small set (enough for round trips, not for quality)."""
    from components.config import DEFAULT_TRAINING
    from components.training.trainer import train_model

    model, history = train_model(
        small_examples["examples"], DEFAULT_TRAINING.replace(**SMALL_TRAINING)
    )
    return model


@pytest.fixture(scope="session")
def small_saved_model(tmp_path_factory, small_examples) -> str:
    """The training stage's artifact (the serving SavedModel) for the small set."""
    from components.config import DEFAULT_TRAINING
    from components.training.trainer import run_training

    path = str(tmp_path_factory.mktemp("trained") / "model")
    run_training(small_examples["examples"], path, DEFAULT_TRAINING.replace(**SMALL_TRAINING))
    return path


def rss_bytes() -> int:
    """This process's resident memory (Linux), for tests that a request costs none."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a loopback port (as s3fs's own tests do); the AWS_* environment points
    s3fs and boto3 at it. Yields the endpoint URL."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in S3_ENVIRONMENT}
    os.environ.update({**S3_ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint})
    try:
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


S3_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": "",
}


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the moto server; returns its s3:// URI."""
    import uuid

    import s3fs

    name = f"mtrec-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def dask_cluster():
    """A dask.distributed cluster on loopback for Beam's DaskRunner: `dask scheduler` and two
    `dask worker --nthreads 1 --no-nanny` processes (this interpreter, this checkout importable).
    Yields the scheduler address, "tcp://127.0.0.1:PORT"; everything is stopped afterwards."""
    import subprocess
    import sys
    import time

    pytest.importorskip("distributed")
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--dashboard-address", ":0", "--no-show"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]  # fmt: skip
    try:
        for _ in range(2):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                     "--no-nanny", "--host", "127.0.0.1", "--no-dashboard"],
                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
        deadline = time.monotonic() + 60
        with Client(address, timeout=60) as client:
            while len(client.scheduler_info()["workers"]) < 2:
                if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                    raise RuntimeError("the dask cluster did not start")
                time.sleep(0.2)
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
