"""A batch of users, the element the Beam evaluation's steps exchange: every train, validation and
test row of a fixed range of user ids, as numpy columns.

Why columns, not a row per element: the rows are read from the examples' TFRecords in chunks
(`examples.iter_columns`, one tf.io.parse_example per chunk) and each chunk is cut by batch, so
the shuffle (one GroupByKey by batch) carries one element per (chunk, batch) with its rows as
arrays, 10 to 14 bytes a row. DirectRunner holds a GroupByKey's input in memory as decoded Python
objects: as a tuple per row that was ~100 bytes a row (10 GB at 100M ratings), as arrays it is the
arrays. Sorting each batch's rows by (user, movie, the other columns) gives the same batch on
every runner and run, whatever order the chunks were grouped in.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from components import features as F
from components import storage

# The columns each split's rows carry into the scoring (besides their user).
SPLIT_COLUMNS: dict[str, tuple[str, ...]] = {
    "train": (F.MOVIE_ID, F.RATING),
    "test": (F.MOVIE_ID, F.RATING, F.STARS),
    "validation": (F.MOVIE_ID, F.STARS),
}
MAX_BATCH_USERS = 2**16  # a user's offset inside its batch travels as uint16


def cut_by_batch(
    chunk: dict[str, np.ndarray], name: str, batch_users: int
) -> Iterator[tuple[int, tuple[str, dict[str, np.ndarray]]]]:
    """(batch, (split, columns)) for each batch of users with rows in the chunk: users
    `batch * batch_users` up to `(batch + 1) * batch_users - 1` share a batch (user ids are
    vocabulary indices, 0 the unknown user), so a user's rows of every split meet in one batch.
    "offset" is the user's place in its batch."""
    if not 0 < batch_users <= MAX_BATCH_USERS:
        raise ValueError(f"batch_users must be in 1..{MAX_BATCH_USERS}, got {batch_users}")
    users = np.asarray(chunk[F.USER_ID], dtype=np.int64)
    keys = users // batch_users
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if keys.size else keys
    for start, stop in zip(starts, [*starts[1:], keys.size], strict=True):
        rows = order[start:stop]
        columns = {"offset": (users[rows] % batch_users).astype(np.uint16)}
        for column in SPLIT_COLUMNS[name]:
            columns[column] = np.asarray(chunk[column][rows])
        yield int(keys[start]), (name, columns)


def assemble(
    key: int, parts: Iterable[tuple[str, dict[str, np.ndarray]]], batch_users: int
) -> dict[str, Any]:
    """One batch from its grouped parts: {"users": sorted user ids with rows in any split,
    split: {"counts": rows per user, column: values sorted by (user, movie, the rest)}}, every
    split of SPLIT_COLUMNS present (empty where the batch has none)."""
    pieces: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in SPLIT_COLUMNS}
    for name, columns in parts:
        pieces[name].append(columns)
    joined = {}
    for name, names in SPLIT_COLUMNS.items():
        items = pieces[name]
        joined[name] = {
            column: (
                np.concatenate([p[column] for p in items])
                if items
                else np.zeros(0, np.uint16 if column == "offset" else np.float32)
            )
            for column in ("offset", *names)
        }
    present = np.unique(np.concatenate([columns["offset"] for columns in joined.values()]))
    out: dict[str, Any] = {"users": key * batch_users + present.astype(np.int64)}
    for name, columns in joined.items():
        row = np.searchsorted(present, columns["offset"])
        order = np.lexsort([columns[c] for c in reversed(SPLIT_COLUMNS[name])] + [row])
        out[name] = {
            "counts": np.bincount(row, minlength=present.size).astype(np.int32),
            **{c: columns[c][order] for c in SPLIT_COLUMNS[name]},
        }
    return out


def save_batch(batch: dict[str, Any], path: str) -> str:
    """Write one assembled batch (an .npz, locally or on an object store) and return its path.

    Why: the batches are read by a dozen steps (catalogue sums, the bias model's sweeps, EASE's
    validation, the scoring), and DirectRunner keeps a PCollection read by several steps in memory
    until the last has read it: ~50 bytes a row at 100M ratings. Spilled, the PCollection holds
    paths and each step loads one batch at a time (TFX components hand over files, too)."""
    arrays = {"users": batch["users"]}
    for name in SPLIT_COLUMNS:
        arrays.update({f"{name}/{column}": values for column, values in batch[name].items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(path, buffer.getvalue())
    return path


def load_batch(path: str) -> dict[str, Any]:
    """The batch `save_batch` wrote."""
    with np.load(io.BytesIO(storage.read_bytes(path))) as arrays:
        batch: dict[str, Any] = {"users": arrays["users"]}
        for key in arrays.files:
            if "/" in key:
                name, column = key.split("/", 1)
                batch.setdefault(name, {})[column] = arrays[key]
    return batch


class Batch:
    """One batch of users as numpy columns for the scoring; `*_rows` index the batch's sorted
    users, and each split's rows are grouped by user in that order."""

    def __init__(self, batch: dict[str, Any] | str) -> None:
        if isinstance(batch, str):
            batch = load_batch(batch)
        self.users = np.asarray(batch["users"], dtype=np.int64)
        index = np.arange(self.users.size)
        test, train, val = batch["test"], batch["train"], batch["validation"]
        self.test_rows = np.repeat(index, test["counts"])
        self.test_movies = test[F.MOVIE_ID].astype(np.int64)
        self.test_ratings = test[F.RATING].astype(np.float64)
        self.test_stars = test[F.STARS].astype(np.float64)
        self.train_rows = np.repeat(index, train["counts"])
        self.train_movies = train[F.MOVIE_ID].astype(np.int64)
        self.train_ratings = train[F.RATING].astype(np.float64)
        self.val_rows = np.repeat(index, val["counts"])
        self.val_movies = val[F.MOVIE_ID].astype(np.int64)
        self.val_stars = val[F.STARS].astype(np.float64)
        self._train_start = np.r_[0, np.cumsum(train["counts"])]
        self._val_start = np.r_[0, np.cumsum(val["counts"])]

    def train_counts(self) -> np.ndarray:
        return np.diff(self._train_start)

    def seen(self, row: int) -> np.ndarray:
        """The movies of the user's train and validation rows (what top-k skips)."""
        t, v = self._train_start, self._val_start
        return np.concatenate(
            [self.train_movies[t[row] : t[row + 1]], self.val_movies[v[row] : v[row + 1]]]
        )

    def history(self, rows: np.ndarray, width: int) -> np.ndarray:
        """Binary [len(rows), width] training history of the given batch rows (EASE's X)."""
        x = np.zeros((rows.size, width), dtype=np.float64)
        local = np.full(self.users.size, -1, dtype=np.int64)
        local[rows] = np.arange(rows.size)
        keep = local[self.train_rows] >= 0
        x[local[self.train_rows[keep]], self.train_movies[keep]] = 1.0
        return x
