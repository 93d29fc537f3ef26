"""Writing the Examples: chunks encoded as `tf.train.Example` records and framed as TFRecords
(masked CRC32C) in one write per chunk; each writer's file is renamed into a shard at the end,
so a killed run leaves no shard a later stage could read.
"""

import struct
import uuid
from typing import Any

import apache_beam as beam
import google_crc32c
import numpy as np
from apache_beam.io.filesystems import FileSystems

from components import features as F
from components import progress
from components.artifacts.examples import TFRECORD_SUFFIX, encode_examples
from components.artifacts.vocabulary import (
    Vocabularies,
)
from components.preprocessing.splits import SPLIT_ORDER, assign_splits, last_k_codes
from components.preprocessing.vocabularies import apply_vocabularies

TEMP_DIR = ".writing"  # the shard writers' files before they are renamed into shards


def encode_rows(
    chunk: dict[str, np.ndarray],
    rows: np.ndarray,
    stars_range: tuple[float, float] = F.DEFAULT_STARS_RANGE,
) -> list[bytes]:
    """tf.train.Example bytes of the selected rows of a chunk (ids already vocabulary
    indices), encoded together (`examples.encode_examples`)."""
    stars = chunk["stars"][rows]
    return encode_examples(
        {
            F.USER_ID: chunk["users"][rows],
            F.MOVIE_ID: chunk["movies"][rows],
            F.RATING: F.normalise_stars(stars, stars_range),
            F.STARS: stars,
            F.TIMESTAMP: chunk["timestamps"][rows],
        }
    )


_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> bytes:
    """TFRecord's masked CRC-32C of a record part."""
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF)


def tfrecord_frames(records: list[bytes]) -> bytes:
    """Records framed as a TFRecord file holds them: length, its CRC, data, the data's CRC.
    Example lengths repeat, so each length header is computed once."""
    headers: dict[int, bytes] = {}
    out = []
    for record in records:
        header = headers.get(len(record))
        if header is None:
            length = struct.pack("<Q", len(record))
            header = headers[len(record)] = length + _masked_crc(length)
        out += (header, record, _masked_crc(record))
    return b"".join(out)


class WriteExamplesFn(beam.DoFn):
    """Column chunks -> split codes -> TFRecord files of Examples (vocabulary indices): per
    bundle, one file per split.

    A chunk is encoded and written as one piece, so no per-row element crosses Beam (that cost
    ~10 us a row in DirectRunner). One output: per chunk and split, (split, the bundle's temporary
    file, counts: rows, rows of an unknown user, of an unknown movie); `finalize_written` renames
    the files into shards. Reported from `process`, not `finish_bundle`: DaskRunner drops what
    `finish_bundle` emits. Paths go through Beam's FileSystems, so the same code writes to gs:// on
    Dataflow."""

    def __init__(
        self,
        temp_dir: str,
        total_rows: int | None,
        stars_range: tuple[float, float],
        last_k_validation: float | None = None,
    ):
        super().__init__()
        self._temp_dir = temp_dir
        self._total = total_rows
        self._stars_range = stars_range
        self._last_k_validation = last_k_validation  # None: exact thresholds, else last-k

    def setup(self):
        self._reporter = progress.Reporter("rows", self._total)

    def start_bundle(self):
        self._files: dict[str, tuple[str, Any]] = {}

    def process(self, chunk, vocab: Vocabularies, thresholds):
        if self._last_k_validation is None:
            codes = assign_splits(chunk["keys"], thresholds)
        else:
            codes = last_k_codes(chunk, thresholds, self._last_k_validation)
        indexed = apply_vocabularies(chunk, vocab)
        for code, split in enumerate(SPLIT_ORDER):
            rows = np.flatnonzero(codes == code)
            if not rows.size:
                continue
            if split not in self._files:
                path = FileSystems.join(self._temp_dir, f"{split}-{uuid.uuid4().hex}")
                self._files[split] = (path, FileSystems.create(path))
            records = encode_rows(indexed, rows, self._stars_range)
            self._files[split][1].write(tfrecord_frames(records))
            counts = [
                rows.size,
                int((indexed["users"][rows] == 0).sum()),
                int((indexed["movies"][rows] == 0).sum()),
            ]
            yield split, self._files[split][0], np.array(counts, dtype=np.int64)
        self._reporter.advance(len(codes))

    def finish_bundle(self):
        for _, handle in self._files.values():
            handle.close()


def finalize_shards(files: list[tuple[str, str]], out_dir: str, split: str) -> int:
    """Rename a split's temporary files to `<split>-NNNNN-of-MMMMM.tfrecord` (an empty shard
    when the split holds no rows); returns the number of shards."""
    paths = sorted({path for name, path in files if name == split})
    if not paths:
        empty = FileSystems.join(out_dir, f"{split}-00000-of-00001{TFRECORD_SUFFIX}")
        FileSystems.create(empty).close()
        return 1
    targets = [
        FileSystems.join(out_dir, f"{split}-{i:05d}-of-{len(paths):05d}{TFRECORD_SUFFIX}")
        for i in range(len(paths))
    ]
    FileSystems.rename(paths, targets)
    return len(paths)


def finalize_written(
    written: list[tuple[str, str, np.ndarray]], out_dir: str
) -> dict[str, np.ndarray]:
    """All of WriteExamplesFn's output at once: every split's files renamed into shards; returns
    per split the summed counts (rows, unknown-user rows, unknown-movie rows)."""
    files = [(split, path) for split, path, _ in written]
    counts = {}
    for split in SPLIT_ORDER:
        finalize_shards(files, out_dir, split)
        counts[split] = sum((c for s, _, c in written if s == split), np.zeros(3, dtype=np.int64))
    return counts
