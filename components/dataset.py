"""Reading the preprocessing output (TFRecords of tf.train.Example) with tf.data.

Streams from files: the trainer never holds the data set in a Python list.
"""

import numpy as np
import tensorflow as tf

from components import features as F
from components.preprocessing import split_files

FEATURE_SPEC = {
    F.USER_ID: tf.io.FixedLenFeature([], tf.int64),
    F.MOVIE_ID: tf.io.FixedLenFeature([], tf.int64),
    F.RATING: tf.io.FixedLenFeature([], tf.float32),
    F.STARS: tf.io.FixedLenFeature([], tf.float32),
}


def _to_model_inputs(batch: dict) -> tuple[dict, tf.Tensor]:
    inputs = {
        F.USER_ID: tf.cast(batch[F.USER_ID], tf.int32),
        F.MOVIE_ID: tf.cast(batch[F.MOVIE_ID], tf.int32),
    }
    return inputs, batch[F.RATING]


def make_dataset(
    examples_dir: str,
    split: str,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    shuffle_buffer: int = 100_000,
    rows: int | None = None,
) -> tf.data.Dataset:
    """(features, normalised rating) batches of one split. `rows` (from stats.json) declares the
    number of batches, so Keras knows the epoch length."""
    files = split_files(examples_dir, split)
    dataset = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if rows is not None:
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(-(-rows // batch_size)))
    return (
        dataset.map(lambda records: tf.io.parse_example(records, FEATURE_SPEC), tf.data.AUTOTUNE)
        .map(_to_model_inputs, tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def load_columns(examples_dir: str, split: str, batch_size: int = 65_536) -> dict[str, np.ndarray]:
    """One split as numpy columns (user_id, movie_id, rating, stars): compact arrays for metrics."""
    files = split_files(examples_dir, split)
    dataset = (
        tf.data.TFRecordDataset(files)
        .batch(batch_size)
        .map(lambda records: tf.io.parse_example(records, FEATURE_SPEC))
    )
    parts: dict[str, list[np.ndarray]] = {name: [] for name in FEATURE_SPEC}
    for batch in dataset.as_numpy_iterator():
        for name, values in batch.items():
            parts[name].append(values)
    columns = {
        name: np.concatenate(values) if values else np.zeros(0) for name, values in parts.items()
    }
    columns[F.USER_ID] = columns[F.USER_ID].astype(np.int32)
    columns[F.MOVIE_ID] = columns[F.MOVIE_ID].astype(np.int32)
    return columns
