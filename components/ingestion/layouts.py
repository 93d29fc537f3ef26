"""The MovieLens release formats ingestion recognises (`LAYOUTS`) and how a folder's is found.

ml-100k's `u.data`/`u.item`; ml-1m and ml-10m's `ratings.dat`/`movies.dat`; ml-20m, ml-25m and
ml-latest's `ratings.csv`/`movies.csv`; plus the layouts of your own logs and of tensorflow-datasets.
"""

import os
from dataclasses import dataclass

from components import storage
from components.errors import DataError

MAX_STARS = 5.0  # every MovieLens release's ratings lie in 0.5..5


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


# Your own interaction logs, as ingestion rewrites them (components/ingestion/interactions.py): ids are
# tokens (int64 or strings, see components/artifacts/vocabulary.py), any finite rating, no header.
INTERACTIONS = Layout("interactions", "", "", "\t", "\t", "", "utf-8", 0.0)


# tensorflow-datasets' other MovieLens sizes (half stars in 20m, 25m, latest-small), as ingestion
# rewrites them: tab-separated, the rating as a number.
TFDS_HALF_STARS = Layout("tfds", "", "", "\t", "|", "", "utf-8", 0.5)


LAYOUTS = {
    layout.name: layout for layout in (ML_100K, ML_DAT, ML_CSV, INTERACTIONS, TFDS_HALF_STARS)
}


MOVIELENS_LAYOUTS = (ML_100K, ML_DAT, ML_CSV)


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
    raise DataError(
        f"{data_dir}: not a MovieLens folder (expected the files of one of: {expected})"
    )
