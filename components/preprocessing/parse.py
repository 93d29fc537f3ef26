"""Parsing in Beam: rows travel in chunks of numpy columns (a block of ~1 MB of lines), never one
element per row. A block is checked and converted at once (`ingestion.parsing.parse_block`); a
block holding a malformed line is parsed line by line, and each malformed line goes to the dead
letter output (file, line number, reason) instead of being dropped.

The parse DoFn has one output of (kind, value) pairs that `ParseRatings` filters into its two
outputs: Beam 2.77's DaskRunner puts every tagged output of a ParDo (`with_outputs`) into one
bag, so each consumer would see the other kind's elements too.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
import numpy as np

from components.artifacts.vocabulary import (
    INT64,
    id_array,
)
from components.ingestion.layouts import ML_100K, Layout
from components.ingestion.parsing import (
    BadRow,
    numbered_lines,
    parse_block,
    parse_rating_line,
    read_line_blocks,
)
from components.preprocessing.splits import SPLIT_RANDOM, SPLIT_TEMPORAL, recency_keys, split_keys

DEAD_LETTER_TAG = "dead_letter"


RATINGS_TAG = "ratings"


_COLUMNS = ("users", "movies", "stars", "timestamps", "keys")


def read_blocks(path: str, source: str) -> Iterator[tuple[str, int, bytes]]:
    """(source, number of the block's first line, whole lines as bytes) blocks of a file, so
    dead letters point at the original line."""
    for first, data in read_line_blocks(path):
        yield source, first, data


@dataclass(frozen=True)
class ParseSettings:
    """How to read the ingested lines: the split keys' seed and kind, the release's layout, and
    the lines the duplicate rule drops (from ingestion.json)."""

    seed: int
    split: str = SPLIT_RANDOM
    layout: Layout = ML_100K
    superseded: frozenset[int] = frozenset()
    id_kinds: tuple[tuple[str, str], ...] = (("user", INT64), ("movie", INT64))


class _ParseChunkFn(beam.DoFn):
    """A block of lines -> ("ratings", dict of numpy columns of the valid rows) and
    ("dead_letter", BadRow) pairs.

    Fast path: the whole block checked and converted at once (`ingestion.parse_block`); a block
    with any bad or blank line is parsed line by line, so each bad line becomes a dead letter
    naming its line."""

    def __init__(self, settings: ParseSettings):
        super().__init__()
        self._settings = settings

    def setup(self):
        self._superseded = np.array(sorted(self._settings.superseded), dtype=np.int64)

    def process(self, element: tuple[str, int, bytes]) -> Iterable[Any]:
        source, first, data = element
        settings = self._settings
        kinds = dict(settings.id_kinds)
        if settings.layout.header and first == 1:
            newline = data.find(b"\n") + 1 or len(data)
            data, first = data[newline:], 2
        if data and not data.endswith(b"\n"):
            data += b"\n"
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None  # the line-by-line path names the line
        chunk = parse_block(text, settings.layout, kinds) if text is not None else None
        if chunk is not None:
            lines = np.arange(first, first + len(chunk["users"]), dtype=np.int64)
            if self._superseded.size:
                keep = ~np.isin(lines, self._superseded)
                chunk = {name: values[keep] for name, values in chunk.items()}
        else:
            chunk = yield from self._parse_lines(source, first, data, kinds)
        if chunk is not None and len(chunk["users"]):
            yield RATINGS_TAG, self._with_keys(chunk)

    def _parse_lines(self, source: str, first: int, data: bytes, kinds: dict[str, str]):
        settings = self._settings
        users, movies, stars, times = [], [], [], []
        for number, line in numbered_lines(data, first, source):
            if number in settings.superseded:
                continue  # a duplicate the rule drops (counted by ingestion)
            parsed = parse_rating_line(line, source, number, settings.layout, kinds)
            if isinstance(parsed, BadRow):
                yield DEAD_LETTER_TAG, parsed
                continue
            users.append(parsed.user_id)
            movies.append(parsed.movie_id)
            stars.append(parsed.stars)
            times.append(parsed.timestamp)
        if not users:
            return None
        return {
            "users": id_array(users, kinds["user"]),
            "movies": id_array(movies, kinds["movie"]),
            "stars": np.asarray(stars, dtype=np.float64),
            "timestamps": np.asarray(times, dtype=np.int64),
        }

    def _with_keys(self, chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        settings = self._settings
        chunk["keys"] = split_keys(
            chunk["users"], chunk["movies"], chunk["timestamps"], settings.seed
        )
        if settings.split != SPLIT_RANDOM:
            chunk["recency"] = recency_keys(chunk["timestamps"], chunk["keys"])
        if settings.split == SPLIT_TEMPORAL:  # the newest rows get the smallest keys
            chunk["keys"] = ~chunk["recency"]
        return chunk


class ParseRatings(beam.PTransform):
    """(source, first line number, bytes) blocks -> column chunks, plus a `dead_letter`
    output."""

    def __init__(self, settings: ParseSettings):
        super().__init__()
        self._parse = _ParseChunkFn(settings)

    def expand(self, chunks):
        parsed = chunks | "Parse" >> beam.ParDo(self._parse)
        return {
            tag: parsed | f"Only{label}" >> beam.FlatMap(_of_kind, tag)
            for tag, label in ((RATINGS_TAG, "Ratings"), (DEAD_LETTER_TAG, "DeadLetters"))
        }


def _of_kind(element: tuple[str, Any], kind: str) -> Iterator[Any]:
    if element[0] == kind:
        yield element[1]
