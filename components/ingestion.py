"""Stage 1, ingestion: bring MovieLens into the pipeline as two artifacts, schema-checked.

Sources: a raw MovieLens folder, its release recognised from its files (`LAYOUTS`: ml-100k's
`u.data`/`u.item`; ml-1m and ml-10m's `ratings.dat`/`movies.dat`; ml-20m, ml-25m and ml-latest's
`ratings.csv`/`movies.csv`), or tensorflow-datasets (`movielens/100k-ratings`). The output is the
same for all: `ratings.tsv`, the source's rating lines as they are (so later errors point at the
original line), `ingestion.json` (layout, counts, the rating scale found in the data, duplicate
(user, movie) rows and the lines the duplicate rule drops), and `movies.tsv` (movie_id \\t title).
Files are streamed, never loaded whole.

Duplicate rule: when a user rated a movie more than once, the newest rating (largest timestamp;
on a tie, the later line) is kept and the others are dropped by preprocessing, counted.
"""

import contextlib
import csv
import json
import logging
import math
import os
import re
import shutil
import socket
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from components import features as F
from components import storage
from components.config import IngestionConfig
from components.errors import DataError
from components.vocabulary import INT64, INT64_MAX, STRING, id_kind_of

log = logging.getLogger(__name__)

MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class Layout:
    """One MovieLens release format: its files, field separators and documented encodings."""

    name: str
    ratings_file: str
    movies_file: str
    separator: str  # between rating fields
    movie_separator: str  # "csv" for quoted CSV titles
    header: str  # the ratings file's first line, or "" when it has none
    movies_encoding: str  # the documented fallback when a movies file is not UTF-8
    stars_step: float  # 1: whole stars; 0.5: half stars

    def describe(self) -> str:
        return f"{self.name} ({self.ratings_file}, {self.movies_file})"


ML_100K = Layout("ml-100k", "u.data", "u.item", "\t", "|", "", "latin-1", 1.0)
ML_DAT = Layout("ml-1m/ml-10m", "ratings.dat", "movies.dat", "::", "::", "", "latin-1", 0.5)
ML_CSV = Layout(
    "ml-20m/ml-25m/ml-latest",
    "ratings.csv",
    "movies.csv",
    ",",
    "csv",
    "userId,movieId,rating,timestamp",
    "utf-8",
    0.5,
)
# Your own interaction logs, as ingestion rewrites them (components/interactions.py): ids are
# tokens (int64 or strings, see components/vocabulary.py), any finite rating, no header.
INTERACTIONS = Layout("interactions", "", "", "\t", "\t", "", "utf-8", 0.0)
# tensorflow-datasets' other MovieLens sizes (half stars in 20m, 25m, latest-small), as ingestion
# rewrites them: tab-separated, the rating as a number.
TFDS_HALF_STARS = Layout("tfds", "", "", "\t", "|", "", "utf-8", 0.5)
LAYOUTS = {
    layout.name: layout for layout in (ML_100K, ML_DAT, ML_CSV, INTERACTIONS, TFDS_HALF_STARS)
}
MOVIELENS_LAYOUTS = (ML_100K, ML_DAT, ML_CSV)
MIN_STARS, MAX_STARS = 0.5, 5.0  # every MovieLens release's ratings lie in this range


class Rating(NamedTuple):
    user_id: int | str  # raw ids: int64 (MovieLens, integer logs) or strings
    movie_id: int | str
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
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")  # a rating: no sign, exponent, 'nan' or underscore
# A rating in your own logs: any finite decimal number.
SIGNED_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _positive_int(value: str, field: str) -> int:
    """Strict: ASCII digits only (Python's int() would also take '1_96', ' 7' or '+3'), and an
    int64 (ids travel as int64 tensors)."""
    if not _DIGITS.fullmatch(value):
        raise ValueError(f"field {field} is not an integer ({value!r})")
    number = int(value)
    if number <= 0:
        raise ValueError(f"field {field} must be a positive integer, got {number}")
    if number > INT64_MAX:
        raise ValueError(f"field {field} exceeds the int64 limit {INT64_MAX} ({value})")
    return number


def parse_token(value: str, field: str, kind: str) -> int | str:
    """A raw id of your own logs, as its kind (checked by ingestion) says."""
    if not value:
        raise ValueError(f"field {field} is empty")
    if kind == INT64:
        if id_kind_of(value) != INT64:
            raise ValueError(f"field {field} is not an int64 id ({value!r})")
        return int(value)
    return value


def _parse_interaction(fields: list[str], id_kinds: dict[str, str]) -> Rating:
    user_id = parse_token(fields[0], F.USER_ID, id_kinds.get("user", STRING))
    movie_id = parse_token(fields[1], F.MOVIE_ID, id_kinds.get("movie", STRING))
    stars = float(fields[2]) if SIGNED_NUMBER.fullmatch(fields[2]) else float("nan")
    if not math.isfinite(stars):
        raise ValueError(f"field {F.STARS} is not a finite number ({fields[2]!r})")
    if not _DIGITS.fullmatch(fields[3]):
        raise ValueError(f"field {F.TIMESTAMP} is not an integer ({fields[3]!r})")
    return Rating(user_id, movie_id, stars, int(fields[3]))


def parse_rating_line(
    line: str,
    source: str,
    line_number: int,
    layout: Layout = ML_100K,
    id_kinds: dict[str, str] | None = None,
) -> Rating | BadRow:
    """Parse one rating line of a layout (user, item, rating, timestamp); `id_kinds` (user and
    movie: int64 or string) for the interactions layout."""
    text = line.rstrip("\r\n")
    fields = text.split(layout.separator)
    if len(fields) != 4:
        what = {"\t": "tab", ",": "comma"}.get(layout.separator, repr(layout.separator))
        return BadRow(
            source, line_number, f"expected 4 {what}-separated fields, got {len(fields)}", text
        )
    if layout is INTERACTIONS or layout.name == INTERACTIONS.name:
        try:
            return _parse_interaction(fields, id_kinds or {})
        except ValueError as err:
            return BadRow(source, line_number, str(err), text)
    try:
        user_id = _positive_int(fields[0], F.USER_ID)
        movie_id = _positive_int(fields[1], F.MOVIE_ID)
        try:
            stars = float(fields[2]) if _NUMBER.fullmatch(fields[2]) else float("nan")
        except ValueError:
            stars = float("nan")
        if stars != stars:
            raise ValueError(f"field {F.STARS} is not a number ({fields[2]!r})")
        low = layout.stars_step if layout.stars_step < 1 else 1.0
        if not low <= stars <= MAX_STARS or (stars / layout.stars_step) % 1:
            step = "whole" if layout.stars_step == 1 else "half"
            raise ValueError(
                f"field {F.STARS} must be {step} stars in {low:g}..{MAX_STARS:g}, got {fields[2]}"
            )
        if not _DIGITS.fullmatch(fields[3]):
            raise ValueError(f"field {F.TIMESTAMP} is not an integer ({fields[3]!r})")
        timestamp = int(fields[3])
    except ValueError as err:
        return BadRow(source, line_number, str(err), text)
    return Rating(user_id, movie_id, stars, timestamp)


_ID = r"[0-9]+"
_STARS = r"[0-9]+(?:\.[0-9]+)?"
_TOKEN = r"[^\t\r\n]+"
_SIGNED = r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_TIME = r"-?[0-9]+"


def _block_pattern(layout: Layout) -> "re.Pattern[str]":
    sep = re.escape(layout.separator)
    if layout.name == INTERACTIONS.name:
        fields = (_TOKEN, _TOKEN, _SIGNED, _TIME)
    else:
        fields = (_ID, _ID, _STARS, _TIME)
    return re.compile(r"(?:" + sep.join(fields) + r"\r?\n)*")


_BLOCK_PATTERNS = {name: _block_pattern(layout) for name, layout in LAYOUTS.items()}


def parse_block(
    text: str, layout: Layout, id_kinds: dict[str, str] | None = None
) -> dict[str, np.ndarray] | None:
    """The fast path of `parse_rating_line` for a whole block of lines (each ending in a
    newline): numpy columns (users, movies, stars, timestamps) when every line is well-formed,
    None otherwise (the caller then parses line by line, which names each bad line). One
    regular expression checks the block's shape; pyarrow's CSV reader converts it; the value
    rules (positive int64 ids, the rating scale) are checked on the columns."""
    if not _BLOCK_PATTERNS[layout.name].fullmatch(text):
        return None
    import pyarrow as pa
    from pyarrow import csv as pacsv

    kinds = id_kinds or {}
    data = text if len(layout.separator) == 1 else text.replace(layout.separator, "\t")
    id_type = {
        role: pa.int64() if layout.name != INTERACTIONS.name or kinds.get(role) == INT64 else pa.string()
        for role in ("user", "movie")
    }
    try:
        table = pacsv.read_csv(
            pa.py_buffer(data.encode()),
            read_options=pacsv.ReadOptions(
                column_names=["u", "m", "s", "t"], use_threads=False, block_size=1 << 26
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=data and ("\t" if len(layout.separator) > 1 else layout.separator),
                quote_char=False,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={
                    "u": id_type["user"], "m": id_type["movie"], "s": pa.float64(), "t": pa.int64()
                },
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )  # fmt: skip
    except (pa.ArrowInvalid, ValueError):  # an int64 overflow, say: the slow path names it
        return None
    columns = {
        name: table.column(short).to_numpy(zero_copy_only=False)
        for name, short in (("users", "u"), ("movies", "m"), ("stars", "s"), ("timestamps", "t"))
    }
    for role, name in (("user", "users"), ("movie", "movies")):
        if id_type[role] == pa.string():
            columns[name] = columns[name].astype(object)
    stars = columns["stars"]
    if layout.name == INTERACTIONS.name:
        if not np.isfinite(stars).all():
            return None
    else:
        low = layout.stars_step if layout.stars_step < 1 else 1.0
        steps = stars / layout.stars_step
        if (
            (columns["users"] <= 0).any()
            or (columns["movies"] <= 0).any()
            or (stars < low).any()
            or (stars > MAX_STARS).any()
            or (steps != np.floor(steps)).any()
        ):
            return None
    return columns


def parse_movie_line(
    line: str, source: str, line_number: int, layout: Layout = ML_100K
) -> tuple[int, str]:
    """Parse one catalogue line (id, title, ...); raise DataError naming the line."""
    text = line.rstrip("\r\n")
    if layout.movie_separator == "csv":
        fields = next(csv.reader([text]), [])
    else:
        fields = text.split(layout.movie_separator)
    if len(fields) < 2:
        raise DataError(f"{source}, line {line_number}: expected id, title, ..., got {line!r}")
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
    for first, data in read_line_blocks(path):
        yield from numbered_lines(data, first, path, encoding)


BLOCK_BYTES = 1 << 20  # ~45k MovieLens rating lines: what the fast path parses at once


def read_line_blocks(path: str, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(number of the first line, whole lines as bytes) blocks of about `block_bytes` of a
    file, so a block's rows keep their line numbers."""
    number = 1
    with open(path, "rb") as handle:
        while True:
            lines = handle.readlines(block_bytes)
            if not lines:
                return
            yield number, b"".join(lines)
            number += len(lines)


def numbered_lines(data: bytes, first: int, path: str, encoding: str = "utf-8"):
    """`read_numbered_lines` over a block: (line number, line), blank lines skipped, a line
    that is not valid `encoding` a DataError naming it."""
    for number, raw in enumerate(data.splitlines(keepends=True), start=first):
        try:
            line = raw.decode(encoding)
        except UnicodeDecodeError as err:
            raise DataError(
                f"{path}, line {number}: not valid {encoding} (byte {raw[err.start]:#04x} "
                f"at column {err.start + 1})"
            ) from None
        if line.strip():
            yield number, line


def movie_file_encoding(path: str, layout: Layout = ML_100K) -> str:
    """UTF-8 when the whole file decodes as UTF-8, else the release's documented encoding."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return layout.movies_encoding
    return "utf-8"


def detect_layout(data_dir: str) -> Layout:
    """The release whose files the folder holds (a ratings file without its catalogue, or the
    reverse, is named as missing)."""
    if not storage.is_remote(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: not found (expected a MovieLens folder)")
    for layout in MOVIELENS_LAYOUTS:
        files = [storage.join(data_dir, name) for name in (layout.ratings_file, layout.movies_file)]
        present = [storage.isfile(path) for path in files]
        if all(present):
            return layout
        if any(present):
            missing = files[present.index(False)]
            raise DataError(f"{missing}: not found (the {layout.describe()} layout needs both)")
    expected = "; ".join(layout.describe() for layout in MOVIELENS_LAYOUTS)
    raise DataError(f"{data_dir}: not a MovieLens folder (expected the files of one of: {expected})")


@dataclass
class IngestionReport:
    source: str
    ratings_rows: int
    invalid_rows: int
    movies: int
    problems: list[str]
    layout: str = ML_100K.name
    stars_range: tuple[float, float] = (1.0, 5.0)
    duplicate_pairs: int = 0
    superseded_lines: list[int] = field(default_factory=list)
    # Raw id kinds (components/vocabulary.py): MovieLens ids are int64.
    id_kinds: dict[str, str] = field(default_factory=lambda: {"user": INT64, "movie": INT64})
    explicit: bool = True  # False: implicit feedback (no rating column): retrieval only
    has_timestamps: bool = True

    @classmethod
    def of(
        cls, source: str, layout: Layout, check: "RatingsCheck", movies: int
    ) -> "IngestionReport":
        return cls(
            source, check.rows, check.invalid, movies, check.problems, layout.name,
            check.stars_range, check.duplicate_pairs, check.superseded_lines,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return {**self.__dict__, "stars_range": list(self.stars_range)}


def read_report(ratings_dir: str) -> dict:
    """ingestion.json of a ratings artifact ({} when it has none: a hand-made artifact)."""
    path = os.path.join(ratings_dir, F.INGESTION_REPORT)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


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


@dataclass
class RatingsCheck:
    rows: int
    invalid: int
    problems: list[str]
    stars_range: tuple[float, float]
    duplicate_pairs: int
    superseded_lines: list[int]  # lines the duplicate rule drops


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
    with _outputs(ratings_dir, movies_dir) as tmp:
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
        movies = _write_movies(
            (parse_movie_line(line, movies_source, number, layout) for number, line in lines),
            os.path.join(tmp, F.MOVIES_FILE),
            movies_source,
        )
        report = IngestionReport.of(ratings_source, layout, check, movies)
        _write_json(os.path.join(tmp, F.INGESTION_REPORT), report.to_dict())
        if storage.is_remote(data_dir):
            os.remove(movies_path)
    return report


def _write_movies(entries, path: str, source: str) -> int:
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


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as out:
        json.dump(payload, out, indent=2)


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
    with _outputs(ratings_dir, movies_dir) as tmp:
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
        count = _write_movies(movie_rows, os.path.join(tmp, F.MOVIES_FILE), f"tfds:{movies_name}")
        report = IngestionReport.of(source, layout, check, count)
        _write_json(os.path.join(tmp, F.INGESTION_REPORT), report.to_dict())
    return report


def run_ingestion(
    data_dir: str, ratings_dir: str, movies_dir: str, config: IngestionConfig | None = None
) -> IngestionReport:
    """Entry point of the stage: your own logs (`config.interactions`), a raw MovieLens folder,
    or tensorflow-datasets."""
    if config is not None and config.interactions:
        if data_dir:
            raise DataError("pass either --data-dir (MovieLens) or --interactions, not both")
        from components.interactions import ingest_interactions

        report = ingest_interactions(config, ratings_dir, movies_dir)
    elif data_dir:
        report = ingest_folder(data_dir, ratings_dir, movies_dir)
    else:
        name = config.tfds_name if config is not None else TFDS_RATINGS
        report = ingest_tfds(ratings_dir, movies_dir, ratings_name=name)
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
