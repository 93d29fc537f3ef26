"""Stage 1, ingestion: bring MovieLens into the pipeline as two artifacts, schema-checked.

Sources: a raw `ml-100k` folder (`u.data`, `u.item`) or tensorflow-datasets
(`movielens/100k-ratings`, `movielens/100k-movies`). Either way the output is the same:
`ratings.tsv` in u.data's format (user \\t movie \\t stars \\t timestamp, line numbers preserved
from the source so later errors point at the original line) and `movies.tsv` (movie_id \\t title).
Files are streamed, never loaded whole.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from components import features as F
from components import storage
from components.errors import DataError

log = logging.getLogger(__name__)

RAW_RATINGS = "u.data"
RAW_MOVIES = "u.item"
RAW_MOVIES_ENCODING = "latin-1"
MAX_REPORTED_PROBLEMS = 20


class Rating(NamedTuple):
    user_id: int
    movie_id: int
    stars: float
    timestamp: int


class BadRow(NamedTuple):
    """A line that failed the schema: where it is and why."""

    source: str
    line_number: int
    reason: str
    line: str

    def describe(self) -> str:
        return f"{self.source}, line {self.line_number}: {self.reason}: {self.line[:80]!r}"


_DIGITS = re.compile(r"-?[0-9]+")  # what a MovieLens integer field may hold


def _positive_int(value: str, field: str) -> int:
    """Strict: ASCII digits only (Python's int() would also take '1_96', ' 7' or '+3')."""
    if not _DIGITS.fullmatch(value):
        raise ValueError(f"field {field} is not an integer ({value!r})")
    number = int(value)
    if number <= 0:
        raise ValueError(f"field {field} must be a positive integer, got {number}")
    return number


def parse_rating_line(line: str, source: str, line_number: int) -> Rating | BadRow:
    """Parse one u.data line (tab-separated user, item, rating, timestamp)."""
    text = line.rstrip("\r\n")
    fields = text.split("\t")
    if len(fields) != 4:
        return BadRow(
            source, line_number, f"expected 4 tab-separated fields, got {len(fields)}", text
        )
    try:
        user_id = _positive_int(fields[0], F.USER_ID)
        movie_id = _positive_int(fields[1], F.MOVIE_ID)
        try:
            stars = float(fields[2])
        except ValueError:
            raise ValueError(f"field {F.STARS} is not a number ({fields[2]!r})") from None
        if not F.MIN_STARS <= stars <= F.MAX_STARS:
            raise ValueError(
                f"field {F.STARS} must be in {F.MIN_STARS}..{F.MAX_STARS}, got {fields[2]}"
            )
        if not _DIGITS.fullmatch(fields[3]):
            raise ValueError(f"field {F.TIMESTAMP} is not an integer ({fields[3]!r})")
        timestamp = int(fields[3])
    except ValueError as err:
        return BadRow(source, line_number, str(err), text)
    return Rating(user_id, movie_id, stars, timestamp)


def parse_movie_line(line: str, source: str, line_number: int) -> tuple[int, str]:
    """Parse one u.item line (pipe-separated id|title|...); raise DataError naming the line."""
    fields = line.rstrip("\r\n").split("|")
    if len(fields) < 2:
        raise DataError(f"{source}, line {line_number}: expected id|title|..., got {line!r}")
    try:
        movie_id = _positive_int(fields[0], F.MOVIE_ID)
    except ValueError as err:
        raise DataError(f"{source}, line {line_number}: {err}") from None
    title = fields[1].strip().replace("\t", " ")
    if not title:
        raise DataError(f"{source}, line {line_number}: field title is empty")
    return movie_id, title


def read_numbered_lines(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """Stream (1-based line number, line) from a file, skipping blank lines (they carry no data
    in MovieLens' formats). A line that is not valid `encoding` is a DataError naming it."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}, line {number}: not valid {encoding} (byte {raw[err.start]:#04x} "
                    f"at column {err.start + 1})"
                ) from None
            if line.strip():
                yield number, line


def movie_file_encoding(path: str) -> str:
    """UTF-8 when the whole file decodes as UTF-8, else the release's documented latin-1."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return RAW_MOVIES_ENCODING
    return "utf-8"


@dataclass
class IngestionReport:
    source: str
    ratings_rows: int
    invalid_rows: int
    movies: int
    problems: list[str]

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@contextlib.contextmanager
def _outputs(ratings_dir: str, movies_dir: str) -> Iterator[str]:
    """One staging folder for both artifacts; they appear (and earlier runs' outputs vanish)
    together, only when the block succeeds. Yields the staging folder."""
    with (
        storage.atomic_output_dir(ratings_dir) as ratings_tmp,
        storage.atomic_output_dir(movies_dir) as movies_tmp,
    ):
        yield ratings_tmp
        os.replace(os.path.join(ratings_tmp, F.MOVIES_FILE), os.path.join(movies_tmp, F.MOVIES_FILE))


def check_ratings(path: str, source_name: str) -> tuple[int, int, list[str]]:
    """Schema-check every rating row: returns (rows, invalid rows, first problems).

    Malformed rows are reported here and handled by preprocessing's dead-letter policy; a file
    whose first data line is not u.data-shaped is rejected outright: it is the wrong file.
    """
    rows = invalid = 0
    problems: list[str] = []
    for number, line in read_numbered_lines(path):
        parsed = parse_rating_line(line, source_name, number)
        rows += 1
        if isinstance(parsed, BadRow):
            if rows == 1:
                raise DataError(
                    f"{parsed.describe()} -- this does not look like MovieLens u.data "
                    "(user \\t item \\t rating \\t timestamp)"
                )
            invalid += 1
            if len(problems) < MAX_REPORTED_PROBLEMS:
                problems.append(parsed.describe())
    if rows == 0:
        raise DataError(f"{source_name}: no rating rows")
    return rows, invalid, problems


def ingest_folder(data_dir: str, ratings_dir: str, movies_dir: str) -> IngestionReport:
    """Ingest a raw ml-100k folder (local, s3:// or gs://): ratings.tsv + ingestion.json, and
    movies.tsv."""
    ratings_source = storage.join(data_dir, RAW_RATINGS)
    movies_source = storage.join(data_dir, RAW_MOVIES)
    for path in (ratings_source, movies_source):
        if not storage.isfile(path):
            raise DataError(
                f"{path}: not found (expected an ml-100k folder with u.data and u.item)"
            )
    with _outputs(ratings_dir, movies_dir) as tmp:
        ratings_path, movies_path = ratings_source, movies_source
        if storage.is_remote(data_dir):
            ratings_path = os.path.join(tmp, F.RATINGS_FILE)
            movies_path = os.path.join(tmp, RAW_MOVIES)
            storage.download_file(ratings_source, ratings_path)
            storage.download_file(movies_source, movies_path)
        rows, invalid, problems = check_ratings(ratings_path, ratings_source)
        if ratings_path != os.path.join(tmp, F.RATINGS_FILE):
            shutil.copyfile(ratings_path, os.path.join(tmp, F.RATINGS_FILE))
        movies = _write_movies(
            (
                parse_movie_line(line, movies_source, number)
                for number, line in read_numbered_lines(
                    movies_path, movie_file_encoding(movies_path)
                )
            ),
            os.path.join(tmp, F.MOVIES_FILE),
            movies_source,
        )
        report = IngestionReport(ratings_source, rows, invalid, movies, problems)
        _write_json(os.path.join(tmp, F.INGESTION_REPORT), report.to_dict())
        if storage.is_remote(data_dir):
            os.remove(movies_path)
    return report


def _write_movies(entries, path: str, source: str) -> int:
    seen: set[int] = set()
    with open(path, "w", encoding="utf-8") as out:
        for movie_id, title in entries:
            if movie_id in seen:
                raise DataError(f"{source}: movie id {movie_id} appears twice in the catalogue")
            seen.add(movie_id)
            out.write(f"{movie_id}\t{title}\n")
    if not seen:
        raise DataError(f"{source}: the movie catalogue is empty")
    return len(seen)


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as out:
        json.dump(payload, out, indent=2)


TFDS_RATINGS = "movielens/100k-ratings"
TFDS_MOVIES = "movielens/100k-movies"
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
    ratings_dir: str, movies_dir: str, tfds_data_dir: str | None = None
) -> IngestionReport:
    """Ingest `movielens/100k-ratings` + `100k-movies` via tensorflow-datasets (downloads once,
    then reads its local copy)."""
    import tensorflow_datasets as tfds

    try:
        prepared = all(
            tfds.builder(name, data_dir=tfds_data_dir).is_prepared()
            for name in (TFDS_RATINGS, TFDS_MOVIES)
        )
        if not prepared:
            _check_download_host()
        ratings = tfds.load(TFDS_RATINGS, split="train", data_dir=tfds_data_dir)
        movies = tfds.load(TFDS_MOVIES, split="train", data_dir=tfds_data_dir)
    except DataError:
        raise
    except Exception as err:  # tfds raises many kinds of download/IO errors
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise _offline_error(f"{type(err).__name__}: {first_line}") from None
    source = f"tfds:{TFDS_RATINGS}"
    with _outputs(ratings_dir, movies_dir) as tmp:
        ratings_path = os.path.join(tmp, F.RATINGS_FILE)
        with open(ratings_path, "w", encoding="utf-8") as out:
            for row in tfds.as_numpy(ratings):
                out.write(
                    f"{int(row['user_id'])}\t{int(row['movie_id'])}\t"
                    f"{int(round(float(row['user_rating'])))}\t{int(row['timestamp'])}\n"
                )
        rows, invalid, problems = check_ratings(ratings_path, source)
        movie_rows = (
            (int(row["movie_id"]), row["movie_title"].decode("utf-8", "replace"))
            for row in tfds.as_numpy(movies)
        )
        count = _write_movies(movie_rows, os.path.join(tmp, F.MOVIES_FILE), f"tfds:{TFDS_MOVIES}")
        report = IngestionReport(source, rows, invalid, count, problems)
        _write_json(os.path.join(tmp, F.INGESTION_REPORT), report.to_dict())
    return report


def run_ingestion(data_dir: str, ratings_dir: str, movies_dir: str) -> IngestionReport:
    """Entry point of the stage: a raw folder when given, tensorflow-datasets otherwise."""
    if data_dir:
        report = ingest_folder(data_dir, ratings_dir, movies_dir)
    else:
        report = ingest_tfds(ratings_dir, movies_dir)
    log.info(
        "ingested %d ratings (%d malformed) and %d movies from %s",
        report.ratings_rows,
        report.invalid_rows,
        report.movies,
        report.source,
    )
    for problem in report.problems:
        log.warning("malformed rating row: %s", problem)
    return report
