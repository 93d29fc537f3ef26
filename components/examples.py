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


# Per feature: the map entry's key field, written once. Every payload below is shorter than 128
# bytes, so each length is a single byte.
_KEYS = {name: _field(1, name.encode()) for name in SCHEMA}
_FLOAT = struct.Struct("<f").pack


def encode_example(values: dict[str, Any]) -> bytes:
    """Serialise one row as a tf.train.Example (what tf.io.parse_example reads). Hot path of
    preprocessing: prefixes are precomputed, lengths are one byte."""
    entries = []
    for name, value in values.items():
        if SCHEMA[name] == "int":
            number = _varint(int(value))
            feature = b"\x1a" + bytes((len(number) + 2, 0x0A, len(number))) + number
        else:
            feature = b"\x12\x06\x0a\x04" + _FLOAT(float(value))
        body = _KEYS[name] + b"\x12" + bytes((len(feature),)) + feature
        entries.append(b"\x0a" + bytes((len(body),)) + body)
    features = b"".join(entries)
    return b"\x0a" + _varint(len(features)) + features


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
    split: str | tuple[str, ...],
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

    splits = (split,) if isinstance(split, str) else split
    parts = [load_columns(examples_dir, name) for name in splits]
    columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
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
