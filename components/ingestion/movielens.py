"""Ingestion of a raw MovieLens folder (local, s3:// or gs://), schema-checked, streamed.

Duplicate rule: when a user rated a movie more than once, the newest rating (largest timestamp;
on a tie, the later line) is kept and the others are dropped by preprocessing, counted.
"""

import os
import shutil
from array import array

import numpy as np

from components import features as F
from components import storage
from components.artifacts.ratings import IngestionReport, RatingsCheck, staged_outputs, write_json
from components.errors import MAX_REPORTED_PROBLEMS, DataError
from components.ingestion.layouts import (
    MAX_STARS,
    ML_100K,
    Layout,
    detect_layout,
    movie_file_encoding,
)
from components.ingestion.parsing import (
    BadRow,
    numbered_lines,
    parse_block,
    parse_movie_line,
    parse_rating_line,
    read_line_blocks,
    read_numbered_lines,
)


def check_ratings(path: str, source_name: str, layout: Layout = ML_100K) -> RatingsCheck:
    """Schema-check every rating row; find the rating scale and the duplicate (user, movie) rows.

    Malformed rows are reported here and handled by preprocessing's dead-letter policy; a file
    whose first data line does not have the layout's shape is rejected outright: it is the wrong
    file.
    """
    rows = invalid = 0
    problems: list[str] = []
    parts: dict[str, list[np.ndarray]] = {"users": [], "movies": [], "times": [], "lines": []}
    low, high = float("inf"), float("-inf")
    for first, data in read_line_blocks(path):
        if layout.header and first == 1:
            newline = data.find(b"\n") + 1 or len(data)
            header = data[:newline].decode("utf-8", "replace").strip()
            if header != layout.header:
                raise DataError(
                    f"{source_name}, line 1: expected the header {layout.header!r}, got "
                    f"{header[:80]!r}"
                )
            data, first = data[newline:], 2
        if data and not data.endswith(b"\n"):
            data += b"\n"
        try:
            block = parse_block(data.decode("utf-8"), layout)
        except UnicodeDecodeError:
            block = None  # the line-by-line path names the line
        if block is not None:
            count = len(block["users"])
            rows += count
            parts["users"].append(block["users"])
            parts["movies"].append(block["movies"])
            parts["times"].append(block["timestamps"])
            parts["lines"].append(np.arange(first, first + count, dtype=np.int64))
            if count:
                low = min(low, float(block["stars"].min()))
                high = max(high, float(block["stars"].max()))
            continue
        users, movies, times, lines = (array("q") for _ in range(4))
        for number, line in numbered_lines(data, first, path):
            parsed = parse_rating_line(line, source_name, number, layout)
            rows += 1
            if isinstance(parsed, BadRow):
                if rows == 1:
                    raise DataError(
                        f"{parsed.describe()} -- this does not look like MovieLens {layout.name} "
                        f"{layout.ratings_file}"
                    )
                invalid += 1
                if len(problems) < MAX_REPORTED_PROBLEMS:
                    problems.append(parsed.describe())
                continue
            users.append(parsed.user_id)
            movies.append(parsed.movie_id)
            times.append(parsed.timestamp)
            lines.append(number)
            low, high = min(low, parsed.stars), max(high, parsed.stars)
        for name, values in zip(parts, (users, movies, times, lines), strict=True):
            parts[name].append(np.frombuffer(values, np.int64))
    if rows == 0:
        raise DataError(f"{source_name}: no rating rows")
    pairs, superseded = superseded_duplicates(
        *(np.concatenate(parts[name]) for name in ("users", "movies", "times", "lines"))
    )
    if low == high:  # one rating value: a scale of one point cannot be normalised
        low, high = min(low, 1.0), max(high, MAX_STARS)
    return RatingsCheck(rows, invalid, problems, (low, high), pairs, superseded)


def superseded_duplicates(
    users: np.ndarray, movies: np.ndarray, times: np.ndarray, lines: np.ndarray
) -> tuple[int, list[int]]:
    """(number of (user, movie) pairs rated more than once, the lines the rule drops): all but
    the newest rating of each pair (largest timestamp; on a tie, the later line)."""
    if users.size == 0:
        return 0, []
    order = np.lexsort((lines, times, movies, users))
    users, movies, lines = users[order], movies[order], lines[order]
    same_as_next = (users[:-1] == users[1:]) & (movies[:-1] == movies[1:])
    dropped = lines[:-1][same_as_next]
    first_of_pair = same_as_next & np.r_[True, ~same_as_next[:-1]]
    return int(first_of_pair.sum()), sorted(dropped.tolist())


def ingest_folder(data_dir: str, ratings_dir: str, movies_dir: str) -> IngestionReport:
    """Ingest a raw MovieLens folder (local, s3:// or gs://): ratings.tsv + ingestion.json, and
    movies.tsv."""
    layout = detect_layout(data_dir)
    ratings_source = storage.join(data_dir, layout.ratings_file)
    movies_source = storage.join(data_dir, layout.movies_file)
    with staged_outputs(ratings_dir, movies_dir) as tmp:
        ratings_path, movies_path = ratings_source, movies_source
        if storage.is_remote(data_dir):
            ratings_path = os.path.join(tmp, F.RATINGS_FILE)
            movies_path = os.path.join(tmp, layout.movies_file)
            storage.download_file(ratings_source, ratings_path)
            storage.download_file(movies_source, movies_path)
        check = check_ratings(ratings_path, ratings_source, layout)
        if ratings_path != os.path.join(tmp, F.RATINGS_FILE):
            shutil.copyfile(ratings_path, os.path.join(tmp, F.RATINGS_FILE))
        lines = read_numbered_lines(movies_path, movie_file_encoding(movies_path, layout))
        if layout.movie_separator == "csv":
            next(lines, None)  # movies.csv's header
        movies = write_movies(
            (parse_movie_line(line, movies_source, number, layout) for number, line in lines),
            os.path.join(tmp, F.MOVIES_FILE),
            movies_source,
        )
        report = IngestionReport.of(ratings_source, layout, check, movies)
        write_json(os.path.join(tmp, F.INGESTION_REPORT), report.to_dict())
        if storage.is_remote(data_dir):
            os.remove(movies_path)
    return report


def write_movies(entries, path: str, source: str) -> int:
    seen: set[int | str] = set()
    with open(path, "w", encoding="utf-8") as out:
        for movie_id, title in entries:
            if movie_id in seen:
                raise DataError(f"{source}: movie id {movie_id} appears twice in the catalogue")
            seen.add(movie_id)
            out.write(f"{movie_id}\t{title}\n")
    if not seen:
        raise DataError(f"{source}: the movie catalogue is empty")
    return len(seen)
