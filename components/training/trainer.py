"""Stage 3, training: fit the multi-task model on the preprocessed TFRecords.

Runs on a GPU when TensorFlow sees one (the KFP task requests `nvidia.com/gpu`), on the CPU
otherwise, and says which in the log. Validates on the validation split (never the test split).
Writes the model artifact: the serving SavedModel (`components/artifacts/saved_model.py`), which
evaluation scores and the pusher copies as it is.
"""

import logging
import time

import keras
import numpy as np
import tensorflow as tf

from components import features as F
from components import progress
from components.artifacts.examples import load_columns, load_stats, make_dataset
from components.artifacts.saved_model import write_saved_model
from components.artifacts.vocabulary import load_vocabularies
from components.config import ConfigError, TrainingConfig
from components.storage import atomic_output_dir
from components.training.model import Recommender
from components.training.seen_movies import SeenMovies

log = logging.getLogger(__name__)

# Training steps per call into the compiled graph: the Python overhead of a step (callbacks,
# the function call) is paid once per call. ~8% less CPU per epoch on ML-100k on 2 cores; the
# progress callback then hears every STEPS_PER_EXECUTION steps.
STEPS_PER_EXECUTION = 8


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
    # Weight averaging: the optimizer keeps an exponential moving average of the weights and
    # `fit` swaps it in when it ends (Keras' `finalize_variable_values`).
    ema = {"use_ema": True, "ema_momentum": config.ema_momentum} if config.ema_momentum else {}
    if config.optimizer == "adagrad":
        return keras.optimizers.Adagrad(config.learning_rate, weight_decay=decay, **ema)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(config.learning_rate, weight_decay=decay, **ema)
    if decay:
        return keras.optimizers.AdamW(config.learning_rate, weight_decay=decay, **ema)
    return keras.optimizers.Adam(config.learning_rate, **ema)


class _EpochLog(keras.callbacks.Callback):
    """One readable line per epoch (KFP logs do not render Keras progress bars well), and the
    steps done as progress markers. With `steps_per_execution` > 1 Keras calls
    `on_train_batch_end` once per execution, with the index of its last step."""

    def __init__(self, epochs: int, steps_per_epoch: int):
        super().__init__()
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self.started = 0.0
        self.reporter = progress.Reporter("steps", epochs * steps_per_epoch)

    def on_train_batch_end(self, batch, logs=None):
        done = self.epoch * self.steps_per_epoch + min(batch + 1, self.steps_per_epoch)
        if done > self.reporter.done:
            self.reporter.advance(done - self.reporter.done)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
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


def for_feedback(config: TrainingConfig, stats: dict) -> TrainingConfig:
    """Implicit feedback (no rating column): the rating head has nothing to learn, so the model
    learns retrieval only (ranking_weight 0) and the export leaves the rating out."""
    if stats.get("explicit", True) or not config.ranking_weight:
        return config
    log.info("implicit feedback (no ratings): retrieval only, ranking_weight 0")
    return config.replace(
        ranking_weight=0.0, retrieval_weight=config.retrieval_weight or 1.0, rerank_pool=0
    )


def build_model(
    examples_dir: str, config: TrainingConfig, fit_splits: tuple[str, ...] = (F.TRAIN_SPLIT,)
) -> Recommender:
    """A fresh model sized from stats.json, with candidates/sampling from the splits it fits."""
    stats = load_stats(examples_dir)
    parts = [load_columns(examples_dir, split) for split in fit_splits]
    train = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    # Tables sized by the vocabularies (+1: the out-of-vocabulary row 0), never by raw ids.
    num_users = stats["vocabulary"]["users"] + 1
    num_movies = stats["vocabulary"]["movies"] + 1
    counts = np.bincount(train[F.MOVIE_ID], minlength=num_movies)
    if config.use_side_features:
        raise ConfigError(
            "use_side_features: the pipeline does not carry side features yet (ingestion keeps "
            "ids and titles only); bench/levers.py measures them from the raw ml-100k folder"
        )
    history = None
    if config.user_history_pooling != "none":
        history = (train[F.USER_ID], train[F.MOVIE_ID])
    model = Recommender(num_users, num_movies, counts, config, user_history=history)
    model.build_for_ids()
    return model


def train_model(
    examples_dir: str,
    config: TrainingConfig,
    verbose: int = 0,
    fit_splits: tuple[str, ...] = (F.TRAIN_SPLIT,),
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[Recommender, dict[str, list[float]]]:
    """Fit a model on `fit_splits` (the train split; every split for the final refit); returns
    it (candidates indexed, ready to retrieve) and its history.

    Under a multi-worker `strategy` (components/training/distributed.py) each worker builds the
    same model in the strategy's scope and reads its shard of the rows, `batch_size` rows a
    step; the epoch is the smallest shard's number of batches, so every worker runs as many
    steps (a collective all-reduce waits for all)."""
    keras.utils.set_random_seed(config.shuffle_seed)
    log.info(describe_devices())
    config = for_feedback(config, load_stats(examples_dir))
    strategy = strategy or tf.distribute.get_strategy()
    workers = strategy.num_replicas_in_sync
    with strategy.scope():
        model = build_model(examples_dir, config, fit_splits)
        # Several steps per call run as a tf.while_loop over the distributed iterator, which
        # fails to compile under MultiWorkerMirroredStrategy (Keras 3.15: an unfed placeholder
        # in the loop's condition): one step per call there.
        per_call = STEPS_PER_EXECUTION if workers == 1 else 1
        model.compile(optimizer=make_optimizer(config), steps_per_execution=per_call)
    rows = load_stats(examples_dir)["rows"]
    fit_rows = sum(rows[split] for split in fit_splits)
    steps = -(-(fit_rows // workers) // config.batch_size)
    # Same batch size as training: the in-batch retrieval loss is only comparable at equal size.
    validate = bool(rows.get(F.VALIDATION_SPLIT)) and F.VALIDATION_SPLIT not in fit_splits
    fit_args: dict = {}
    if workers == 1:
        train = make_dataset(
            examples_dir,
            fit_splits,
            config.batch_size,
            shuffle=True,
            seed=config.shuffle_seed,
            rows=fit_rows,
        )
        validation = None
        if validate:
            validation = make_dataset(
                examples_dir, F.VALIDATION_SPLIT, config.batch_size, rows=rows[F.VALIDATION_SPLIT]
            )
    else:

        def shard_of(splits, total, shuffle):
            def dataset_fn(context: tf.distribute.InputContext):
                return make_dataset(
                    examples_dir,
                    splits,
                    config.batch_size,
                    shuffle=shuffle,
                    seed=config.shuffle_seed,
                    rows=total,
                    shard=(context.input_pipeline_id, context.num_input_pipelines),
                    repeat=True,
                )

            return strategy.distribute_datasets_from_function(dataset_fn)

        train = shard_of(fit_splits, fit_rows, True)
        fit_args["steps_per_epoch"] = steps
        validation = None
        if validate:
            validation = shard_of(F.VALIDATION_SPLIT, rows[F.VALIDATION_SPLIT], False)
            fit_args["validation_steps"] = max(
                1, -(-(rows[F.VALIDATION_SPLIT] // workers) // config.batch_size)
            )
    started = time.perf_counter()
    history = model.fit(
        train,
        epochs=config.epochs,
        validation_data=validation,
        verbose=verbose,
        callbacks=[_EpochLog(config.epochs, steps)],
        shuffle=False,  # the tf.data pipeline shuffles
        **fit_args,
    )
    log.info("fit took %.1fs", time.perf_counter() - started)
    model.index_candidates()
    curves = {name: [float(v) for v in values] for name, values in history.history.items()}
    return model, curves


def rated_movies(examples_dir: str, num_users: int) -> SeenMovies:
    """Every (user, movie) the pipeline ingested, all splits: what `serving_default` skips."""
    columns = [
        load_columns(examples_dir, split) for split in F.SPLITS if _has_rows(examples_dir, split)
    ]
    return SeenMovies(
        np.concatenate([c[F.USER_ID] for c in columns]),
        np.concatenate([c[F.MOVIE_ID] for c in columns]),
        num_users,
    )


def _has_rows(examples_dir: str, split: str) -> bool:
    return bool(load_stats(examples_dir)["rows"].get(split))


def run_training(
    examples_dir: str,
    model_dir: str,
    config: TrainingConfig,
    model_name: str = F.DEFAULT_MODEL_NAME,
    refit_on_all: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> dict:
    """Train and write the serving SavedModel into `model_dir` (atomically); returns the
    history. `refit_on_all`: the final fit after blessing, on every split (train, validation
    and test) with the same settings; the blessing keeps the evaluated model's figures.
    `config.workers` > 1 without a `strategy`: the run is handed to that many worker processes
    on this machine (`launcher.train_on_local_workers`); each of them calls this function
    with its MultiWorkerMirroredStrategy, and every one exports (collectives need all), the
    chief into `model_dir`, the others into scratch folders the caller discards."""
    if config.workers > 1 and strategy is None:
        from components.training.launcher import train_on_local_workers

        return train_on_local_workers(examples_dir, model_dir, config, model_name, refit_on_all)
    return fit_and_export(examples_dir, model_dir, config, model_name, refit_on_all, strategy)[1]


def fit_and_export(
    examples_dir: str,
    model_dir: str,
    config: TrainingConfig,
    model_name: str = F.DEFAULT_MODEL_NAME,
    refit_on_all: bool = False,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[Recommender, dict[str, list[float]], float]:
    """One process's training and export (see `run_training`): the model, its history and the
    seconds `train_model` took."""
    started = time.perf_counter()
    fit_splits = (
        tuple(s for s in F.SPLITS if _has_rows(examples_dir, s))
        if refit_on_all
        else (F.TRAIN_SPLIT,)
    )
    model, history = train_model(examples_dir, config, fit_splits=fit_splits, strategy=strategy)
    fit_seconds = time.perf_counter() - started
    seen = rated_movies(examples_dir, model.num_users)
    stats = load_stats(examples_dir)
    with atomic_output_dir(model_dir) as staging:
        write_saved_model(
            model,
            seen,
            load_vocabularies(examples_dir, stats),
            staging,
            history,
            {
                "train_seconds": round(time.perf_counter() - started, 2),
                "fit_splits": list(fit_splits),
                "examples_rows": stats["rows"],
                "stars_range": stats.get("stars_range", list(F.DEFAULT_STARS_RANGE)),
                "explicit": stats.get("explicit", True),
            },
            model_name,
        )
    return model, history, fit_seconds
