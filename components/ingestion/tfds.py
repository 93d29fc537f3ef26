"""Ingestion from tensorflow-datasets (`movielens/100k-ratings` and the other sizes it hosts):
online only; offline it stops and says to pass --data-dir.
"""

import os
import socket

from components import features as F
from components.artifacts.ratings import IngestionReport, staged_outputs, write_json
from components.errors import DataError
from components.ingestion.layouts import ML_100K, TFDS_HALF_STARS
from components.ingestion.movielens import check_ratings, write_movies

TFDS_RATINGS = "movielens/100k-ratings"  # the default --tfds-name


def tfds_names(ratings_name: str) -> tuple[str, str]:
    """(ratings, movies) tensorflow-datasets names of a MovieLens size, e.g.
    movielens/1m-ratings -> movielens/1m-movies."""
    if not (ratings_name.startswith("movielens/") and ratings_name.endswith("-ratings")):
        raise DataError(
            f"--tfds-name {ratings_name!r}: expected a MovieLens ratings data set of "
            "tensorflow-datasets, e.g. movielens/100k-ratings, movielens/1m-ratings, "
            "movielens/25m-ratings"
        )
    return ratings_name, ratings_name[: -len("-ratings")] + "-movies"


DOWNLOAD_HOST = "files.grouplens.org"  # where tensorflow-datasets fetches ml-100k.zip


def _offline_error(reason: str) -> DataError:
    return DataError(
        f"could not load MovieLens through tensorflow-datasets ({reason}). "
        "Offline? Pass --data-dir pointing at an ml-100k folder (u.data, u.item)."
    )


def _check_download_host(timeout: float = 5.0) -> None:
    """Fail in seconds when GroupLens cannot be reached (tfds itself retries for minutes)."""
    try:
        socket.create_connection((DOWNLOAD_HOST, 443), timeout=timeout).close()
    except OSError as err:
        raise _offline_error(f"cannot reach {DOWNLOAD_HOST}: {err}") from None


def ingest_tfds(
    ratings_dir: str,
    movies_dir: str,
    tfds_data_dir: str | None = None,
    ratings_name: str = TFDS_RATINGS,
) -> IngestionReport:
    """Ingest a MovieLens size's ratings + movies via tensorflow-datasets (downloads once, then
    reads its local copy); `movielens/100k-ratings` by default."""
    ratings_name, movies_name = tfds_names(ratings_name)
    import tensorflow_datasets as tfds

    try:
        prepared = all(
            tfds.builder(name, data_dir=tfds_data_dir).is_prepared()
            for name in (ratings_name, movies_name)
        )
        if not prepared:
            _check_download_host()
        ratings = tfds.load(ratings_name, split="train", data_dir=tfds_data_dir)
        movies = tfds.load(movies_name, split="train", data_dir=tfds_data_dir)
    except DataError:
        raise
    except Exception as err:  # tfds raises many kinds of download/IO errors
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise _offline_error(f"{type(err).__name__}: {first_line}") from None
    source = f"tfds:{ratings_name}"
    layout = ML_100K if ratings_name == TFDS_RATINGS else TFDS_HALF_STARS
    with staged_outputs(ratings_dir, movies_dir) as tmp:
        ratings_path = os.path.join(tmp, F.RATINGS_FILE)
        with open(ratings_path, "w", encoding="utf-8") as out:
            for row in tfds.as_numpy(ratings):
                stars = float(row["user_rating"])
                text = f"{int(round(stars))}" if layout is ML_100K else f"{stars:g}"
                out.write(
                    f"{int(row['user_id'])}\t{int(row['movie_id'])}\t{text}\t"
                    f"{int(row['timestamp'])}\n"
                )
        check = check_ratings(ratings_path, source, layout)
        movie_rows = (
            (int(row["movie_id"]), row["movie_title"].decode("utf-8", "replace"))
            for row in tfds.as_numpy(movies)
        )
        count = write_movies(movie_rows, os.path.join(tmp, F.MOVIES_FILE), f"tfds:{movies_name}")
        report = IngestionReport.of(source, layout, check, count)
        write_json(os.path.join(tmp, F.INGESTION_REPORT), report.to_dict())
    return report
