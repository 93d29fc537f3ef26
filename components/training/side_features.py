"""Side features of ML-100k users and movies as id-indexed arrays (row = id, row 0 = padding).

Why arrays: the model's inputs stay (user_id, movie_id), so serving signatures do not change;
the model looks the features up by id inside its towers. Every feature is one-hot or multi-hot,
so a linear projection of it is a sum of small per-value embeddings.
"""

from __future__ import annotations

import os

import numpy as np

NUM_GENRES = 19  # u.item's genre flags (u.genre), "unknown" included
# Release-year bucket edges: ML-100k is mostly 1990s, so the 1990s are split finely.
YEAR_EDGES = (1940, 1960, 1970, 1980, 1990, 1994, 1996, 1997, 1998)
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's age groups
GENDERS = ("M", "F")
ENCODING = "latin-1"  # u.item titles are ISO-8859-1


def one_hot_bucket(values: np.ndarray, edges: tuple[int, ...], known: np.ndarray) -> np.ndarray:
    """[n, len(edges) + 1] one-hot of each value's bucket (np.digitize); unknown rows all zero."""
    out = np.zeros((len(values), len(edges) + 1), dtype=np.float32)
    rows = np.flatnonzero(known)
    out[rows, np.digitize(np.asarray(values)[rows], edges)] = 1.0
    return out


def movie_features(lines: list[str], num_movies: int) -> np.ndarray:
    """[num_movies, genres + year buckets] from u.item lines (`id|title|date|video|url|flags`)."""
    ids, years, genres = [], [], []
    for line in lines:
        fields = line.rstrip("\n").split("|")
        if len(fields) < 5 + NUM_GENRES:
            continue
        ids.append(int(fields[0]))
        date = fields[2].strip()
        years.append(int(date[-4:]) if len(date) >= 4 and date[-4:].isdigit() else -1)
        genres.append([float(flag) for flag in fields[5 : 5 + NUM_GENRES]])
    ids_a, years_a = np.asarray(ids, dtype=np.int64), np.asarray(years)
    keep = ids_a < num_movies
    out = np.zeros((num_movies, NUM_GENRES + len(YEAR_EDGES) + 1), dtype=np.float32)
    out[ids_a[keep], :NUM_GENRES] = np.asarray(genres, dtype=np.float32).reshape(-1, NUM_GENRES)[
        keep
    ]
    out[ids_a[keep], NUM_GENRES:] = one_hot_bucket(years_a[keep], YEAR_EDGES, years_a[keep] > 0)
    return out


def user_features(lines: list[str], occupations: list[str], num_users: int) -> np.ndarray:
    """[num_users, age buckets + gender + occupation] from u.user lines (`id|age|sex|job|zip`)."""
    width = len(AGE_EDGES) + 1 + len(GENDERS) + len(occupations)
    out = np.zeros((num_users, width), dtype=np.float32)
    job_index = {name: i for i, name in enumerate(occupations)}
    for line in lines:
        fields = line.rstrip("\n").split("|")
        if len(fields) < 4 or not fields[0].isdigit() or int(fields[0]) >= num_users:
            continue
        row = out[int(fields[0])]
        if fields[1].isdigit():
            row[: len(AGE_EDGES) + 1] = one_hot_bucket(
                np.array([int(fields[1])]), AGE_EDGES, np.array([True])
            )[0]
        if fields[2] in GENDERS:
            row[len(AGE_EDGES) + 1 + GENDERS.index(fields[2])] = 1.0
        if fields[3] in job_index:
            row[len(AGE_EDGES) + 1 + len(GENDERS) + job_index[fields[3]]] = 1.0
    return out


def load_side_features(data_dir: str, vocabularies) -> tuple[np.ndarray, np.ndarray]:
    """(user_features, movie_features) of an ml-100k folder (u.user, u.occupation, u.item),
    one row per vocabulary index (row 0, out of vocabulary: all zero)."""

    def read(name: str) -> list[str]:
        with open(os.path.join(data_dir, name), encoding=ENCODING) as handle:
            return handle.readlines()

    occupations = [line.strip() for line in read("u.occupation") if line.strip()]
    out = []
    for table, vocabulary in (
        (user_features(read("u.user"), occupations, _id_rows(read("u.user"))), vocabularies.users),
        (movie_features(read("u.item"), _id_rows(read("u.item"))), vocabularies.movies),
    ):
        raw = vocabulary.raw(np.arange(vocabulary.rows))
        rows = table[np.clip(raw, 0, len(table) - 1)]
        rows[(raw <= 0) | (raw >= len(table))] = 0.0
        out.append(rows)
    return out[0], out[1]


def _id_rows(lines: list[str]) -> int:
    """Rows of a raw-id-indexed table: the largest id of a `|`-separated file, plus one."""
    return max(int(line.split("|", 1)[0]) for line in lines if line.strip()) + 1
