"""Parsing of rating and movie lines, strict: every bad field is a `BadRow` or a `DataError` naming
file, line and field. Shared by ingestion (the schema check) and preprocessing (the Beam parser),
so both read a line the same way.
"""

import csv
import math
import re
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from components import features as F
from components.artifacts.vocabulary import INT64, INT64_MAX, STRING, id_kind_of
from components.errors import DataError
from components.ingestion.layouts import INTERACTIONS, LAYOUTS, MAX_STARS, ML_100K, Layout


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


DIGITS = re.compile(r"-?[0-9]+")  # what a MovieLens integer field may hold


_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")  # a rating: no sign, exponent, 'nan' or underscore


# A rating in your own logs: any finite decimal number.
SIGNED_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _positive_int(value: str, field: str) -> int:
    """Strict: ASCII digits only (Python's int() would also take '1_96', ' 7' or '+3'), and an
    int64 (ids travel as int64 tensors)."""
    if not DIGITS.fullmatch(value):
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
    if not DIGITS.fullmatch(fields[3]):
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
        if not DIGITS.fullmatch(fields[3]):
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
        role: pa.int64()
        if layout.name != INTERACTIONS.name or kinds.get(role) == INT64
        else pa.string()
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
