"""Vocabularies in Beam (TFX Transform's `compute_and_apply_vocabulary`): user and movie ids of the
training split counted (memory bounded by the number of distinct ids), most frequent first; ids
rarer than the minimum counts go to the out-of-vocabulary row 0.
"""

from collections import Counter

import apache_beam as beam
import numpy as np

from components.artifacts.vocabulary import (
    Vocabularies,
    Vocabulary,
)


class IdStatsFn(beam.CombineFn):
    """Distinct users/movies and the largest ids: memory bounded by the vocabularies."""

    def create_accumulator(self):
        return set(), set()

    def add_input(self, acc, chunk):
        acc[0].update(np.unique(chunk["users"]).tolist())
        acc[1].update(np.unique(chunk["movies"]).tolist())
        return acc

    def merge_accumulators(self, accs):
        users, movies = set(), set()
        for u, m in accs:
            users |= u
            movies |= m
        return users, movies

    def extract_output(self, acc):
        users, movies = acc
        return {"users": len(users), "movies": len(movies)}


class VocabularyCountsFn(beam.CombineFn):
    """Ratings per raw user and movie id of the training split: (Counter, Counter). Each chunk
    is counted with numpy first, so the Python work is per distinct id of a chunk, and the
    accumulators are bounded by the number of distinct ids, not rows."""

    def create_accumulator(self):
        return Counter(), Counter()

    def add_input(self, acc, chunk):
        for counter, column in zip(acc, (chunk["users"], chunk["movies"]), strict=True):
            distinct, counts = np.unique(column, return_counts=True)
            for token, count in zip(distinct.tolist(), counts.tolist(), strict=True):
                counter[token] += count
        return acc

    def merge_accumulators(self, accs):
        users, movies = Counter(), Counter()
        for u, m in accs:
            users.update(u)
            movies.update(m)
        return users, movies

    def extract_output(self, acc):
        return acc


class BuildVocabularies(beam.DoFn):
    def __init__(self, id_kinds: dict[str, str], min_user_count: int, min_item_count: int):
        super().__init__()
        self._kinds = id_kinds
        self._min_counts = (min_user_count, min_item_count)

    def process(self, counts):
        users, movies = counts
        yield Vocabularies(
            Vocabulary.from_counts(users, self._kinds["user"], self._min_counts[0]),
            Vocabulary.from_counts(movies, self._kinds["movie"], self._min_counts[1]),
        )


def vocabulary_text(vocabulary: Vocabulary) -> str:
    """A vocabulary file's content as one element (WriteToText adds the last newline): one
    element keeps the lines in index order on any runner."""
    return "\n".join(str(token) for token in vocabulary.tokens.tolist())


def apply_vocabularies(chunk: dict[str, np.ndarray], vocab: Vocabularies) -> dict[str, np.ndarray]:
    """A chunk with raw ids replaced by vocabulary indices (0: out of vocabulary)."""
    out = dict(chunk)
    out["users"] = vocab.users.lookup(chunk["users"])
    out["movies"] = vocab.movies.lookup(chunk["movies"])
    return out
