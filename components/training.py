"""Stage 3, training: fit the multi-task model on the preprocessed TFRecords.

Runs on a GPU when TensorFlow sees one (the KFP task requests `nvidia.com/gpu`), on the CPU
otherwise, and says which in the log. Writes the model artifact (weights + spec) and the
per-epoch history (`history.json`) the report plots.
"""

import json
import logging
import os
import time

import keras
import numpy as np
import tensorflow as tf
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import features as F
from components.config import TrainingConfig
from components.dataset import load_columns, make_dataset
from components.model import Recommender
from components.preprocessing import load_stats

log = logging.getLogger(__name__)

HISTORY_FILE = "history.json"


def describe_devices() -> str:
    """Which device the training step will run on; logged so a GPU request can be verified."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = []
        for gpu in gpus:
            details = tf.config.experimental.get_device_details(gpu)
            names.append(f"{gpu.name} ({details.get('device_name', 'GPU')})")
        return "training on GPU: " + ", ".join(names)
    return "no GPU visible to TensorFlow: training on CPU"


def make_optimizer(config: TrainingConfig) -> keras.optimizers.Optimizer:
    decay = config.weight_decay or None
    if config.optimizer == "adagrad":
        return keras.optimizers.Adagrad(config.learning_rate, weight_decay=decay)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(config.learning_rate, weight_decay=decay)
    if decay:
        return keras.optimizers.AdamW(config.learning_rate, weight_decay=decay)
    return keras.optimizers.Adam(config.learning_rate)


class _EpochLog(keras.callbacks.Callback):
    """One readable line per epoch (KFP logs do not render Keras progress bars well)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
        log.info(
            "epoch %d/%d (%.1fs): %s",
            epoch + 1,
            self.epochs,
            time.perf_counter() - self.started,
            metrics,
        )


def build_model(examples_dir: str, config: TrainingConfig) -> Recommender:
    """A fresh model sized from stats.json, with candidates/sampling from the training split."""
    stats = load_stats(examples_dir)
    train = load_columns(examples_dir, F.TRAIN_SPLIT)
    num_movies = stats["max_movie_id"] + 1
    counts = np.bincount(train[F.MOVIE_ID], minlength=num_movies)
    model = Recommender(stats["max_user_id"] + 1, num_movies, counts, config)
    model.build_for_ids()
    return model


def train_model(
    examples_dir: str, config: TrainingConfig, verbose: int = 0
) -> tuple[Recommender, dict[str, list[float]]]:
    """Fit a model; returns it (candidates indexed, ready to retrieve) and its history."""
    keras.utils.set_random_seed(config.shuffle_seed)
    log.info(describe_devices())
    model = build_model(examples_dir, config)
    model.compile(optimizer=make_optimizer(config))
    rows = load_stats(examples_dir)["rows"]
    train = make_dataset(
        examples_dir,
        F.TRAIN_SPLIT,
        config.batch_size,
        shuffle=True,
        seed=config.shuffle_seed,
        rows=rows[F.TRAIN_SPLIT],
    )
    # Same batch size as training: the in-batch retrieval loss is only comparable at equal size.
    validation = make_dataset(
        examples_dir, F.TEST_SPLIT, config.batch_size, rows=rows[F.TEST_SPLIT]
    )
    started = time.perf_counter()
    history = model.fit(
        train,
        epochs=config.epochs,
        validation_data=validation,
        verbose=verbose,
        callbacks=[_EpochLog(config.epochs)],
        shuffle=False,  # the tf.data pipeline shuffles
    )
    log.info("fit took %.1fs", time.perf_counter() - started)
    model.index_candidates()
    curves = {name: [float(v) for v in values] for name, values in history.history.items()}
    return model, curves


def run_training(examples_dir: str, model_dir: str, config: TrainingConfig) -> dict:
    """Train and write the model artifact and history.json; returns the history."""
    model, history = train_model(examples_dir, config)
    model.save_artifact(model_dir)
    with open(os.path.join(model_dir, HISTORY_FILE), "w", encoding="utf-8") as handle:
        json.dump(history, handle)
    return history


# --- KFP component ---


def training_op(
    examples: Input[Dataset],
    training_config: dict,
    model: Output[Model],
    training_metrics: Output[Metrics],
):
    """Train the multi-task recommender (uses the GPU the task requests, when present)."""
    import logging

    from components.config import TrainingConfig
    from components.errors import exit_on_error
    from components.training import run_training

    logging.basicConfig(level=logging.INFO)
    with exit_on_error():
        history = run_training(examples.path, model.path, TrainingConfig.from_dict(training_config))
        for name, values in history.items():
            training_metrics.log_metric(f"final_{name}", values[-1])
        model.metadata["framework"] = "keras"
