"""Your own interaction logs as a source of the ingestion stage (`mtrec run --interactions`).

A CSV file with a header, or Parquet, with a user, an item, optionally a rating and a timestamp
column (names from `IngestionConfig`). Ids are any strings or integers: when every id of a
column is a canonical int64 decimal the column's kind is int64, else string (clients then send
ids exactly as they appear). Without a rating column the data is implicit feedback: every row is
a positive, and the model learns retrieval only. Rows are checked strictly: the first bad field
stops ingestion with file, line and field. The output is the MovieLens sources' output:
`ratings.tsv` (user, item, rating, timestamp, tab-separated), `movies.tsv` (item, title) and
`ingestion.json` (with `id_kinds` and `explicit`).
"""

from __future__ import annotations

import csv
import math
import os
from array import array
from collections.abc import Iterator

import numpy as np

from components import features as F
from components import storage
from components.artifacts.ratings import IngestionReport, staged_outputs, write_json
from components.artifacts.vocabulary import INT64, STRING, id_kind_of
from components.config import IngestionConfig
from components.errors import DataError
from components.ingestion.layouts import INTERACTIONS
from components.ingestion.movielens import superseded_duplicates
from components.ingestion.parsing import DIGITS, SIGNED_NUMBER

PARQUET_SUFFIXES = (".parquet", ".pq")
IMPLICIT_STARS = 1.0  # every logged interaction is a positive
MAX_ID_CHARS = 1024  # an id longer than this is a mistake in the file, not an id
CSV_FIELD_LIMIT = 1 << 20


def _is_parquet(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def read_table_rows(path: str, source: str) -> tuple[list[str], Iterator[tuple[int, list]]]:
    """(column names, iterator of (line or row number, values)) of a CSV file with a header or
    a Parquet file. CSV values are the text as written; Parquet values as stored."""
    if _is_parquet(path):
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several kinds for a file that is not Parquet
            raise DataError(f"{source}: not a readable Parquet file ({err})") from None
        names = list(handle.schema_arrow.names)

        def parquet_rows() -> Iterator[tuple[int, list]]:
            number = 0
            for batch in handle.iter_batches(batch_size=65_536):
                columns = [column.to_pylist() for column in batch.columns]
                for values in zip(*columns, strict=True):
                    number += 1
                    yield number, list(values)

        return names, parquet_rows()
    raw = open(path, "rb")  # noqa: SIM115 - closed by the generator below
    physical = [0]

    def decoded_lines() -> Iterator[str]:
        """Each physical line decoded on its own, so a bad byte is reported on its line."""
        for number, line in enumerate(raw, start=1):
            physical[0] = number
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{source}, line {number}: not valid UTF-8 (byte {line[err.start]:#04x} at "
                    f"column {err.start + 1})"
                ) from None

    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(decoded_lines())
    try:
        header = next(reader, None)
    except csv.Error as err:
        raw.close()
        raise DataError(f"{source}, line 1: cannot read the header ({err})") from None
    except DataError:
        raw.close()
        raise
    if not header:
        raw.close()
        raise DataError(f"{source}: empty file (expected a CSV header naming the columns)")

    def csv_rows() -> Iterator[tuple[int, list]]:
        with raw:
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    raise DataError(f"{source}, line {physical[0]}: {err}") from None
                if values:
                    yield physical[0], values

    return [name.strip() for name in header], csv_rows()


def _column_index(names: list[str], wanted: str, source: str, required: bool) -> int | None:
    if names.count(wanted) > 1:
        raise DataError(f"{source}: column {wanted!r} appears {names.count(wanted)} times")
    if wanted in names:
        return names.index(wanted)
    if required:
        raise DataError(f"{source}: no column {wanted!r} (columns: {', '.join(names)})")
    return None


def _id_text(value, field: str) -> str:
    if value is None:
        raise ValueError(f"field {field} is empty")
    if isinstance(value, bool | float):
        raise ValueError(f"field {field} must be a string or an integer, got {value!r}")
    text = str(value)
    if not text:
        raise ValueError(f"field {field} is empty")
    if len(text) > MAX_ID_CHARS:
        raise ValueError(f"field {field} is longer than {MAX_ID_CHARS} characters")
    if any(c in text for c in "\t\n\r"):
        raise ValueError(f"field {field} contains a tab or a line break")
    return text


def _number(value, field: str) -> float:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"field {field} is not a number ({value!r})")
    if (
        isinstance(value, int | float)
        or isinstance(value, str)
        and SIGNED_NUMBER.fullmatch(value.strip())
    ):
        number = float(value)
    else:
        raise ValueError(f"field {field} is not a number ({value!r})")
    if not math.isfinite(number):
        raise ValueError(f"field {field} is not a finite number ({value!r})")
    return number


def _timestamp(value, field: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and DIGITS.fullmatch(value.strip()):
        return int(value)
    if hasattr(value, "timestamp"):  # a Parquet timestamp column arrives as datetime
        return int(value.timestamp())
    raise ValueError(f"field {field} is not an integer timestamp ({value!r})")


class _Codes:
    """Distinct ids -> small integer codes (duplicate detection); memory bounded by ids."""

    def __init__(self):
        self.codes: dict[str, int] = {}
        self.kind = INT64

    def code(self, text: str) -> int:
        code = self.codes.get(text)
        if code is None:
            code = self.codes[text] = len(self.codes)
            if self.kind == INT64 and id_kind_of(text) != INT64:
                self.kind = STRING
        return code


def ingest_interactions(
    config: IngestionConfig, ratings_dir: str, movies_dir: str
) -> IngestionReport:
    """Ingest your own logs (and optional item catalogue) into the ratings and movies
    artifacts."""
    with staged_outputs(ratings_dir, movies_dir) as tmp:
        path = _local(config.interactions, tmp, "interactions")
        report = _write_ratings(config, path, tmp)
        if config.items:
            items = _local(config.items, tmp, "items")
            movies = _write_catalogue(items, config.items, config.item_column, tmp)
            if items != config.items:
                os.remove(items)
        else:
            movies = report.movies
        report.movies = movies
        write_json(os.path.join(tmp, F.INGESTION_REPORT), report.to_dict())
        if path != config.interactions:
            os.remove(path)
    return report


def _local(path: str, tmp: str, name: str) -> str:
    if storage.is_remote(path):
        local = os.path.join(tmp, f"{name}.download{os.path.splitext(path)[1]}")
        storage.download_file(path, local)
        return local
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found (expected a CSV or Parquet file)")
    return path


def _write_ratings(config: IngestionConfig, path: str, tmp: str) -> IngestionReport:
    source = config.interactions
    names, rows = read_table_rows(path, source)
    user = _column_index(names, config.user_column, source, True)
    item = _column_index(names, config.item_column, source, True)
    rating = _column_index(names, config.rating_column, source, False)
    stamp = _column_index(names, config.timestamp_column, source, False)
    users, items = _Codes(), _Codes()
    user_codes, item_codes, times, lines = (array("q") for _ in range(4))
    low, high = float("inf"), float("-inf")
    count = 0
    with open(os.path.join(tmp, F.RATINGS_FILE), "w", encoding="utf-8") as out:
        for number, values in rows:
            if len(values) != len(names):
                raise DataError(
                    f"{source}, line {number}: expected {len(names)} fields (the header's), "
                    f"got {len(values)}"
                )
            try:
                user_id = _id_text(values[user], config.user_column)
                item_id = _id_text(values[item], config.item_column)
                stars = (
                    _number(values[rating], config.rating_column)
                    if rating is not None
                    else IMPLICIT_STARS
                )
                timestamp = (
                    _timestamp(values[stamp], config.timestamp_column) if stamp is not None else 0
                )
            except ValueError as err:
                raise DataError(f"{source}, line {number}: {err}") from None
            count += 1
            out.write(f"{user_id}\t{item_id}\t{stars!r}\t{timestamp}\n")
            user_codes.append(users.code(user_id))
            item_codes.append(items.code(item_id))
            times.append(timestamp)
            lines.append(count)  # the line of ratings.tsv the row went to
            low, high = min(low, stars), max(high, stars)
    if count == 0:
        raise DataError(f"{source}: no interaction rows")
    pairs, superseded = superseded_duplicates(
        np.frombuffer(user_codes, np.int64), np.frombuffer(item_codes, np.int64),
        np.frombuffer(times, np.int64), np.frombuffer(lines, np.int64),
    )  # fmt: skip
    explicit = rating is not None
    if not explicit or low == high:  # one value: a scale of one point cannot be normalised
        low, high = min(low, 0.0), max(high, 1.0)
    if not config.items:
        with open(os.path.join(tmp, F.MOVIES_FILE), "w", encoding="utf-8") as out:
            out.writelines(f"{item_id}\t{item_id}\n" for item_id in items.codes)
    return IngestionReport(
        source, count, 0, len(items.codes), [], INTERACTIONS.name, (low, high), pairs, superseded,
        id_kinds={"user": users.kind, "movie": items.kind}, explicit=explicit,
        has_timestamps=stamp is not None,
    )  # fmt: skip


def _write_catalogue(path: str, source: str, item_column: str, tmp: str) -> int:
    """movies.tsv from the items file: the item column (or the first) and `title` (or the
    second)."""
    names, rows = read_table_rows(path, source)
    if len(names) < 2:
        raise DataError(f"{source}: expected an id and a title column, got {names}")
    item = names.index(item_column) if item_column in names else 0
    title = names.index("title") if "title" in names else (1 if item != 1 else 0)
    seen: set[str] = set()
    with open(os.path.join(tmp, F.MOVIES_FILE), "w", encoding="utf-8") as out:
        for number, values in rows:
            try:
                item_id = _id_text(values[item], names[item])
            except (ValueError, IndexError) as err:
                raise DataError(f"{source}, line {number}: {err}") from None
            if item_id in seen:
                raise DataError(f"{source}, line {number}: item {item_id} appears twice")
            seen.add(item_id)
            text = str(values[title]) if title < len(values) and values[title] is not None else ""
            text = " ".join(text.split()) or item_id
            out.write(f"{item_id}\t{text}\n")
    if not seen:
        raise DataError(f"{source}: the item catalogue is empty")
    return len(seen)
