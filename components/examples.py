"""The examples artifact that preprocessing writes and training and evaluation read.

Layout: `<split>-NNNNN-of-MMMMM.tfrecord` shards of `tf.train.Example` per split (train,
validation, test) and `stats.json` (counts, id ranges, split settings). Schema, writer and
reader live here together; the writer encodes the Examples itself (a fixed, tiny schema), so the
Beam job does not import TensorFlow, and the reader imports TensorFlow only when called.
"""

import json
import os
import struct
from typing import Any

import numpy as np

from components import features as F
from components.errors import DataError

# Feature name -> "int" (int64_list) or "float" (float_list); one value each.
SCHEMA: dict[str, str] = {
    F.USER_ID: "int",
    F.MOVIE_ID: "int",
    F.RATING: "float",
    F.STARS: "float",
    F.TIMESTAMP: "int",
}
TFRECORD_SUFFIX = ".tfrecord"


# --- writer: tf.train.Example wire format (Example > Features > map<string, Feature>) ---


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values take ten bytes, as protobuf encodes them
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _entry(name: str, feature: bytes) -> bytes:
    return _field(1, _field(1, name.encode()) + _field(2, feature))


def encode_example(values: dict[str, Any]) -> bytes:
    """Serialise one row as a tf.train.Example (what tf.io.parse_example reads)."""
    entries = []
    for name in sorted(values):
        value = values[name]
        if SCHEMA[name] == "int":
            feature = _field(3, _field(1, _varint(int(value))))  # Int64List, packed
        else:
            feature = _field(2, _field(1, struct.pack("<f", float(value))))  # FloatList
        entries.append(_entry(name, feature))
    return _field(1, b"".join(entries))


# --- reader ---


def split_files(examples_dir: str, split: str) -> list[str]:
    """The TFRecord shards of one split inside a preprocessing output."""
    if not os.path.isdir(examples_dir):
        raise DataError(f"{examples_dir}: not found (expected a preprocessing output)")
    files = sorted(
        os.path.join(examples_dir, name)
        for name in os.listdir(examples_dir)
        if name.startswith(split + "-") and name.endswith(TFRECORD_SUFFIX)
    )
    if not files:
        raise DataError(f"{examples_dir}: no {split} TFRecords (expected a preprocessing output)")
    return files


def load_stats(examples_dir: str) -> dict[str, Any]:
    """stats.json: written last, so its presence marks a complete preprocessing output."""
    path = os.path.join(examples_dir, F.STATS_FILE)
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found (expected a preprocessing output)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def feature_spec() -> dict:
    import tensorflow as tf

    kinds = {"int": tf.int64, "float": tf.float32}
    return {name: tf.io.FixedLenFeature([], kinds[kind]) for name, kind in SCHEMA.items()}


def make_dataset(
    examples_dir: str,
    split: str,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    rows: int | None = None,
):
    """(features, normalised rating) batches of one split.

    The shards are parsed once, in large batches, into three in-memory columns (12 bytes a row:
    300 MB for 25M ratings); each epoch then shuffles and batches tensors, so the input pipeline
    never limits the training step (parsing records every epoch ran at ~115k rows/s on 2 cores).
    `rows` (from stats.json) is checked against what the shards hold."""
    import tensorflow as tf

    columns = load_columns(examples_dir, split)
    if rows is not None and len(columns[F.USER_ID]) != rows:
        raise DataError(
            f"{examples_dir}: {split} holds {len(columns[F.USER_ID])} rows, stats.json says {rows}"
        )
    dataset = tf.data.Dataset.from_tensor_slices(
        (
            {F.USER_ID: columns[F.USER_ID], F.MOVIE_ID: columns[F.MOVIE_ID]},
            columns[F.RATING].astype(np.float32),
        )
    )
    if shuffle:
        dataset = dataset.shuffle(
            len(columns[F.USER_ID]) or 1, seed=seed, reshuffle_each_iteration=True
        )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def load_columns(examples_dir: str, split: str, batch_size: int = 65_536) -> dict[str, np.ndarray]:
    """One split as numpy columns (ids as int32, rating, stars, timestamp)."""
    import tensorflow as tf

    spec = feature_spec()
    dataset = (
        tf.data.TFRecordDataset(split_files(examples_dir, split))
        .batch(batch_size)
        .map(lambda records: tf.io.parse_example(records, spec))
    )
    parts: dict[str, list[np.ndarray]] = {name: [] for name in spec}
    for batch in dataset.as_numpy_iterator():
        for name, values in batch.items():
            parts[name].append(values)
    columns = {
        name: np.concatenate(values) if values else np.zeros(0) for name, values in parts.items()
    }
    columns[F.USER_ID] = columns[F.USER_ID].astype(np.int32)
    columns[F.MOVIE_ID] = columns[F.MOVIE_ID].astype(np.int32)
    return columns
