"""User and movie vocabularies: raw id (as it appears in the data) <-> dense index.

The role of TFX Transform's `compute_and_apply_vocabulary`: preprocessing counts ids in the
training split (in Beam, memory bounded by the number of distinct ids), keeps those seen at least
`min_count` times, most frequent first, and writes one file per vocabulary into the examples
artifact. Index 0 is the out-of-vocabulary row (rare and unseen ids); the vocabulary's i-th line
is index i (1-based). Embedding tables are sized by the vocabularies, never by the largest raw id,
and the exported SavedModel carries the same mapping, so clients send and receive raw ids.

Raw ids are int64 (every id a canonical decimal integer that fits, as in MovieLens) or strings.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from components.errors import DataError

OOV_INDEX = 0
INT64, STRING = "int64", "string"
ID_KINDS = (INT64, STRING)
VOCABULARY_DIR = "vocabulary"
USERS_FILE = "users.txt"
MOVIES_FILE = "movies.txt"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def id_kind_of(token: str) -> str:
    """INT64 when the token is a canonical decimal integer that fits int64, else STRING."""
    if token and (token.isascii() and token.lstrip("-").isdigit()):
        value = int(token)
        if str(value) == token and INT64_MIN <= value <= INT64_MAX:
            return INT64
    return STRING


def id_array(values: Iterable, kind: str) -> np.ndarray:
    """Raw ids as the array type of their kind (int64, or Python strings in an object array)."""
    if kind == INT64:
        return np.asarray(list(values) if not isinstance(values, np.ndarray) else values, np.int64)
    return np.asarray([str(v) for v in values], dtype=object)


@dataclass(frozen=True)
class Vocabulary:
    """Index i (1..size) <-> raw id `tokens[i - 1]`; index 0 is out of vocabulary."""

    kind: str
    tokens: np.ndarray  # int64, or object array of str; most frequent first

    def __post_init__(self) -> None:
        if self.kind not in ID_KINDS:
            raise ValueError(f"id kind must be one of {ID_KINDS}, got {self.kind!r}")
        order = np.argsort(self._sortable(self.tokens), kind="stable")
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_sorted", self._sortable(self.tokens)[order])

    @property
    def size(self) -> int:
        """Vocabulary entries, the out-of-vocabulary row not counted."""
        return len(self.tokens)

    @property
    def rows(self) -> int:
        """Embedding rows the vocabulary needs: one per entry plus the out-of-vocabulary row."""
        return self.size + 1

    def _sortable(self, values) -> np.ndarray:
        if self.kind == INT64:
            return np.asarray(values, dtype=np.int64)
        return np.asarray(values, dtype=str) if len(values) else np.zeros(0, dtype="<U1")

    def lookup(self, raw) -> np.ndarray:
        """Raw ids -> indices (int64; OOV_INDEX for ids outside the vocabulary)."""
        values = self._sortable(raw)
        if not self.size or not values.size:
            return np.zeros(values.shape, dtype=np.int64)
        position = np.searchsorted(self._sorted, values)
        clipped = np.minimum(position, self.size - 1)
        found = self._sorted[clipped] == values
        return np.where(found, self._order[clipped] + 1, OOV_INDEX).astype(np.int64)

    def raw(self, indices) -> np.ndarray:
        """Indices -> raw ids; `missing` (-1 / "") for OOV_INDEX and negative indices."""
        indices = np.asarray(indices, dtype=np.int64)
        padded = np.concatenate([[self.missing], self.tokens]).astype(self.tokens.dtype)
        out = padded[np.clip(indices, 0, self.size)]
        out[indices <= OOV_INDEX] = self.missing
        return out

    @property
    def missing(self):
        """The raw id that means "no movie" in outputs and padding in inputs."""
        return -1 if self.kind == INT64 else ""

    @classmethod
    def from_counts(cls, counts: Counter | dict, kind: str, min_count: int = 1) -> Vocabulary:
        """Ids seen at least `min_count` times, most frequent first (ties: by raw id), so the
        vocabulary is the same whatever order the counts arrived in."""
        kept = [(token, n) for token, n in counts.items() if n >= min_count]
        kept.sort(key=lambda item: (-item[1], item[0]))
        return cls(kind, id_array([token for token, _ in kept], kind))

    def write(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as out:
            out.writelines(f"{token}\n" for token in self.tokens.tolist())

    @classmethod
    def read(cls, path: str, kind: str) -> Vocabulary:
        if not os.path.isfile(path):
            raise DataError(f"{path}: not found (expected a vocabulary written by preprocessing)")
        with open(path, encoding="utf-8") as handle:
            tokens = [token for token in handle.read().split("\n") if token]  # ids are never ""
        return cls(kind, id_array(tokens, kind))


@dataclass(frozen=True)
class Vocabularies:
    users: Vocabulary
    movies: Vocabulary

    def write(self, examples_dir: str) -> None:
        folder = os.path.join(examples_dir, VOCABULARY_DIR)
        os.makedirs(folder, exist_ok=True)
        self.users.write(os.path.join(folder, USERS_FILE))
        self.movies.write(os.path.join(folder, MOVIES_FILE))


def load_vocabularies(examples_dir: str, stats: dict) -> Vocabularies:
    """The vocabularies of a preprocessing output (kinds from its stats.json)."""
    kinds = stats["vocabulary"]["id_kinds"]
    folder = os.path.join(examples_dir, VOCABULARY_DIR)
    return Vocabularies(
        Vocabulary.read(os.path.join(folder, USERS_FILE), kinds["user"]),
        Vocabulary.read(os.path.join(folder, MOVIES_FILE), kinds["movie"]),
    )
