"""The ratings artifact ingestion writes and preprocessing reads: `ratings.tsv` (the source's lines
as they are, so later errors point at the original line), `ingestion.json` (`IngestionReport`:
layout, counts, the rating scale found in the data, duplicates) and, beside it, the movies
artifact's `movies.tsv` (movie_id \\t title). Both appear together or not at all.
"""

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from components import features as F
from components import storage
from components.artifacts.vocabulary import INT64
from components.ingestion.layouts import ML_100K, Layout


@dataclass
class RatingsCheck:
    rows: int
    invalid: int
    problems: list[str]
    stars_range: tuple[float, float]
    duplicate_pairs: int
    superseded_lines: list[int]  # lines the duplicate rule drops


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
    # Raw id kinds (components/artifacts/vocabulary.py): MovieLens ids are int64.
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
def staged_outputs(ratings_dir: str, movies_dir: str) -> Iterator[str]:
    """One staging folder for both artifacts; they appear (and earlier runs' outputs vanish)
    together, only when the block succeeds. Yields the staging folder."""
    with (
        storage.atomic_output_dir(ratings_dir) as ratings_tmp,
        storage.atomic_output_dir(movies_dir) as movies_tmp,
    ):
        yield ratings_tmp
        os.replace(
            os.path.join(ratings_tmp, F.MOVIES_FILE), os.path.join(movies_tmp, F.MOVIES_FILE)
        )


def write_json(path: str, payload: dict) -> None:
    with open(path, "w", encoding="utf-8") as out:
        json.dump(payload, out, indent=2)
