"""Shared fixtures: a small generated MovieLens-format data set and the real ML-100k when present."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED_ML100K = os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ml-100k")
)


def write_movielens(
    directory: str, users: int = 60, movies: int = 40, per_user: int = 25, seed: int = 0
) -> str:
    """Write u.data / u.item in ML-100k's format, with latent structure a model can learn."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    user_taste = rng.normal(size=(users + 1, 3))
    movie_traits = rng.normal(size=(movies + 1, 3))
    popularity = np.linspace(1.5, 0.2, movies)
    lines = []
    for user in range(1, users + 1):
        weights = popularity * np.exp(movie_traits[1:] @ user_taste[user] * 0.5)
        chosen = rng.choice(
            movies, size=min(per_user, movies), replace=False, p=weights / weights.sum()
        )
        for index in chosen:
            movie = int(index) + 1
            affinity = movie_traits[movie] @ user_taste[user]
            stars = int(np.clip(np.round(3 + affinity + rng.normal(scale=0.5)), 1, 5))
            lines.append(f"{user}\t{movie}\t{stars}\t{874000000 + len(lines)}\n")
    with open(os.path.join(directory, "u.data"), "w", encoding="utf-8") as handle:
        handle.writelines(lines)
    with open(os.path.join(directory, "u.item"), "w", encoding="latin-1") as handle:
        for movie in range(1, movies + 1):
            handle.write(
                f"{movie}|Movie {movie} (199{movie % 10})|01-Jan-1995||http://example.invalid/{movie}"
                + "|0" * 19
                + "\n"
            )
    return directory


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory) -> str:
    return write_movielens(str(tmp_path_factory.mktemp("ml-small")))


@pytest.fixture(scope="session")
def ml100k_dir() -> str:
    """The real ML-100k when ../shared has it (CI does); a generated set of the same format if not."""
    if os.path.isfile(os.path.join(SHARED_ML100K, "u.data")):
        return SHARED_ML100K
    return small_data_dir_fallback()


def small_data_dir_fallback() -> str:
    import tempfile

    return write_movielens(tempfile.mkdtemp(prefix="ml-fallback-"), users=200, movies=120)


@pytest.fixture(scope="session")
def small_examples(tmp_path_factory, small_data_dir) -> dict[str, str]:
    """Ingestion + Beam preprocessing outputs of the small data set (built once per session)."""
    from components.config import PreprocessingConfig
    from components.ingestion import run_ingestion
    from components.preprocessing import run_preprocessing

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
    from components.training import train_model

    model, history = train_model(
        small_examples["examples"], DEFAULT_TRAINING.replace(**SMALL_TRAINING)
    )
    return model
