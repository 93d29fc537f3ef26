"""The pipeline's configuration: one typed object, parsed once at the entry point.

`PipelineConfig` groups one dataclass per stage. Each stage section round-trips through a plain
dict (`to_dict` / `from_dict`), which is how it travels as a KFP pipeline parameter.
`SEED_TRAINING` is the seed notebook's settings (the `seed` preset); `DEFAULT_TRAINING` the tuned
model (the `default` preset). `KubeflowConfig` holds the cluster's platform settings only.
"""

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Self

from components.errors import MtrecError
from components.features import DEFAULT_MODEL_NAME


class ConfigError(MtrecError, ValueError):
    """A configuration value is invalid; the message names the field."""


def _coerce(owner: str, name: str, hint: Any, value: Any) -> Any:
    """Restore a field's type after a trip through JSON/protobuf (KFP turns ints into floats)."""
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and float(value).is_integer()
        ):
            return int(value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(hint) is tuple:
        if typing.get_args(hint)[0] is str and isinstance(value, list | tuple):
            if all(isinstance(v, str) for v in value):
                return tuple(value)
        elif isinstance(value, list | tuple) and all(
            isinstance(v, int | float) and float(v).is_integer() for v in value
        ):
            return tuple(int(v) for v in value)
    else:
        return value
    raise ConfigError(f"{owner}.{name}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


class _Section:
    """dict round trip shared by every config section."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Self:
        values = dict(values or {})
        names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        for name in list(values):
            values[name] = _coerce(cls.__name__, name, hints[name], values[name])
        obj = cls(**values)
        obj.validate()
        return obj

    def replace(self, **changes: Any) -> Self:
        obj = dataclasses.replace(self, **changes)  # type: ignore[type-var]
        obj.validate()
        return obj

    def validate(self) -> None:  # pragma: no cover - overridden where there is something to check
        return None


@dataclass(frozen=True)
class IngestionConfig(_Section):
    """Your own interaction logs (instead of a MovieLens folder): a CSV file with a header, or
    Parquet; columns named by the fields below. Without the rating column the model learns
    retrieval only (implicit feedback); without the timestamp column every row gets time 0."""

    interactions: str = ""  # CSV or Parquet file (local, s3:// or gs://)
    items: str = ""  # optional catalogue (CSV or Parquet: item column and `title`)
    user_column: str = "user_id"
    item_column: str = "item_id"
    rating_column: str = "rating"
    timestamp_column: str = "timestamp"
    # Without --data-dir or --interactions: the tensorflow-datasets MovieLens size (online).
    tfds_name: str = "movielens/100k-ratings"

    def validate(self) -> None:
        names = (self.user_column, self.item_column, self.rating_column, self.timestamp_column)
        if any(not name for name in names):
            raise ConfigError("ingestion column names must not be empty")
        if len(set(names)) != len(names):
            raise ConfigError(f"ingestion columns must be distinct, got {list(names)}")
        if self.items and not self.interactions:
            raise ConfigError("items: a catalogue goes with --interactions")


@dataclass(frozen=True)
class PreprocessingConfig(_Section):
    """Beam preprocessing: split and bad-row policy."""

    # random: a seeded hash split with exact counts; temporal: the newest test_fraction of all
    # rows (a global time cut); last-k: each user's last_k newest ratings.
    split: str = "random"
    test_fraction: float = 0.2  # the seed's 80,000 / 20,000 on ML-100k (exact counts)
    last_k: int = 1
    # Carved from the rest (train): curves, early stopping and tuning never read the test split.
    validation_fraction: float = 0.1
    split_seed: int = 42
    max_invalid_share: float = 0.0  # fail when more than this share of rows is malformed
    # Ids with fewer training ratings share the out-of-vocabulary row (index 0).
    min_user_count: int = 1
    min_item_count: int = 1
    runner: str = "DirectRunner"  # Prism downloads a binary at run time: name the runner

    def validate(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.split not in ("random", "temporal", "last-k"):
            raise ConfigError(f"split must be random, temporal or last-k, got {self.split!r}")
        if self.last_k < 1:
            raise ConfigError(f"last_k must be >= 1, got {self.last_k}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if not 0.0 <= self.max_invalid_share <= 1.0:
            raise ConfigError(f"max_invalid_share must be in [0, 1], got {self.max_invalid_share}")
        for name in ("min_user_count", "min_item_count"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


RETRIEVAL_NEGATIVES = ("in-batch", "mixed", "full")
LEARNING_RATE_SCHEDULES = ("constant", "cosine")
HISTORY_POOLINGS = ("none", "mean", "sqrtn")


@dataclass(frozen=True)
class TrainingConfig(_Section):
    """The multi-task model and its optimisation."""

    embedding_dim: int = 32
    # 5 heads of 256 units, averaged, with weight averaging and bias L2: validation RMSE 0.2247
    # -> 0.2200 (bench/quality_findings.md, "RMSE").
    rating_hidden_units: tuple[int, ...] = (256,)
    # Feed the element-wise product user*movie to the rating head besides the concatenation
    # (the GMF/NCF interaction a plain MLP on [user, movie] learns poorly).
    rating_product_feature: bool = False
    rating_dropout: float = 0.0  # dropout after each hidden layer of the rating head
    rating_input_dropout: float = 0.0  # dropout on the rating head's input (the embeddings)
    # Rating heads from different initial weights, their predictions averaged.
    rating_heads: int = 5
    use_bias_terms: bool = True  # learned global, user and movie biases in the rating head
    embedding_l2: float = (
        1e-3  # L2 on both embedding tables: helps hit@10 and RMSE (bench/quality.py)
    )
    # L2 on the learned user and movie rating biases: shrinks the biases of rarely rated ids
    # (the bias baseline's ridge); 0 = unregularised.
    bias_l2: float = 3e-3
    retrieval_weight: float = 1.0
    ranking_weight: float = 20.0
    retrieval_loss_reduction: str = "mean"  # the seed sums the in-batch cross-entropy
    temperature: float = 0.05
    sampling_correction_weight: float = 2.0  # logQ correction of in-batch negatives (0 = seed)
    remove_accidental_hits: bool = True
    # Retrieval negatives besides the batch's own movies. "in-batch" (the seed's), "mixed"
    # (plus `sampled_negatives` movies drawn uniformly per batch, Yang et al. 2020) or "full"
    # (every candidate movie: an exact softmax, affordable for catalogues of a few thousand).
    retrieval_negatives: str = "mixed"
    # 2048 (with rerank_rating_weight 2): recall@10 +0.002 on validation over 1024 (weight 3),
    # its smallest margin over EASE (bench/quality_findings.md, "RMSE").
    sampled_negatives: int = 2048
    # Rating-aware retrieval: a rating below `liked_rating` (normalised; 0.75 = 4 stars) weighs
    # `disliked_retrieval_weight` in the retrieval loss (1 = every rating is a positive).
    liked_rating: float = 0.75
    disliked_retrieval_weight: float = 0.3
    # User tower = id embedding + pooled embeddings of the movies the user rated in training
    # (FISM / YouTube-DNN style item-to-item signal): "none", "mean" or "sqrtn". Needs the
    # training history passed to the model; a training pair's own movie is left out of its pool.
    user_history_pooling: str = "none"
    # Add a linear projection of the user's (age, gender, occupation) and the movie's (genres,
    # release year) one-hot side features to the towers; the arrays are passed to the model.
    use_side_features: bool = False
    # Extra user/movie embeddings seen only by the rating head (0 = none: it reads the shared ones).
    rating_embedding_dim: int = 0
    # Retrieve-then-rank at recommendation time: the first `rerank_pool` retrieved movies are
    # re-ordered by retrieval logit (score / temperature) + `rerank_rating_weight` x predicted
    # rating (normalised). 0 = retrieval order only. 20 scores as well as 50 on validation
    # (bench/quality_findings.md, "Rerank pool") at 2.5x less rating-head work per served user.
    rerank_pool: int = 20
    rerank_rating_weight: float = 2.0
    optimizer: str = "adam"
    # 8 epochs at 1e-2 beat 16 at 3e-3 on validation (hit@10, recall@10, NDCG@10; RMSE within
    # 0.0004) in half the steps: bench/quality_findings.md, "Fewer epochs".
    learning_rate: float = 1e-2
    # "constant" or "cosine" (decay to `final_learning_rate_fraction` of it over all epochs).
    learning_rate_schedule: str = "cosine"
    final_learning_rate_fraction: float = 0.3  # with ema_momentum: averaging needs steps that move
    weight_decay: float = 0.0  # decoupled (AdamW-style) weight decay, any optimizer
    # Weight averaging: the model ends with an exponential moving average of its weights over
    # the steps (this momentum per step; 0 = the last step's weights).
    ema_momentum: float = 0.99
    # The optimizer updates only the embedding rows each batch looks up (and their Adam/Adagrad
    # slots; Adam becomes LazyAdam), and embedding_l2 / bias_l2 apply to those rows only, instead
    # of every row of every table each step: the step's cost follows the batch, not the
    # vocabularies (components/optimizers.py). For large catalogues (bench/scale.py).
    lazy_embedding_updates: bool = False
    batch_size: int = 1024  # per worker: with `workers` N, each step trains on N x batch_size rows
    epochs: int = 8
    shuffle_seed: int = 42
    top_k: int = 10
    # Training processes under tf.distribute.MultiWorkerMirroredStrategy (synchronous data
    # parallelism): locally mtrec starts them on loopback with the TF_CONFIG a Kubeflow TFJob
    # gives its replicas; each trains on its shard of the rows (components/training/distributed.py).
    workers: int = 1

    def validate(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.embedding_dim <= 0:
            raise ConfigError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.epochs <= 0 or self.batch_size <= 0 or self.top_k <= 0:
            raise ConfigError("epochs, batch_size and top_k must be positive")
        if self.retrieval_weight < 0 or self.ranking_weight < 0:
            raise ConfigError("loss weights must be >= 0")
        if self.retrieval_weight == 0 and self.ranking_weight == 0:
            raise ConfigError("at least one of retrieval_weight, ranking_weight must be > 0")
        if self.optimizer not in ("adam", "adagrad", "sgd"):
            raise ConfigError(f"optimizer must be adam, adagrad or sgd, got {self.optimizer!r}")
        if self.retrieval_loss_reduction not in ("sum", "mean"):
            raise ConfigError("retrieval_loss_reduction must be 'sum' or 'mean'")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.retrieval_negatives not in RETRIEVAL_NEGATIVES:
            raise ConfigError(
                f"retrieval_negatives must be one of {RETRIEVAL_NEGATIVES}, "
                f"got {self.retrieval_negatives!r}"
            )
        if self.sampled_negatives < 0 or self.rating_embedding_dim < 0 or self.rerank_pool < 0:
            raise ConfigError("sampled_negatives, rating_embedding_dim, rerank_pool must be >= 0")
        if self.retrieval_negatives == "mixed" and self.sampled_negatives == 0:
            raise ConfigError("retrieval_negatives='mixed' needs sampled_negatives > 0")
        for name in ("rating_dropout", "rating_input_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.rating_heads < 1:
            raise ConfigError(f"rating_heads must be >= 1, got {self.rating_heads}")
        if self.disliked_retrieval_weight < 0:
            raise ConfigError("disliked_retrieval_weight must be >= 0")
        if self.user_history_pooling not in HISTORY_POOLINGS:
            raise ConfigError(
                f"user_history_pooling must be one of {HISTORY_POOLINGS}, "
                f"got {self.user_history_pooling!r}"
            )
        if self.learning_rate_schedule not in LEARNING_RATE_SCHEDULES:
            raise ConfigError(
                f"learning_rate_schedule must be one of {LEARNING_RATE_SCHEDULES}, "
                f"got {self.learning_rate_schedule!r}"
            )
        if not 0.0 <= self.final_learning_rate_fraction <= 1.0:
            raise ConfigError("final_learning_rate_fraction must be in [0, 1]")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ConfigError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if self.lazy_embedding_updates and self.weight_decay:
            raise ConfigError(
                "lazy_embedding_updates: weight_decay would decay whole tables every step "
                "(use embedding_l2, applied to the rows each batch touches)"
            )


@dataclass(frozen=True)
class GateConfig(_Section):
    """The evaluation stage: its Beam runner and options, and the blessing thresholds (defaults
    are ones the default model passes on ML-100k)."""

    # The evaluation is a Beam job (as preprocessing): Prism downloads a binary, name the runner.
    evaluation_runner: str = "DirectRunner"
    # Runner flags passed through untouched (Dataflow's --project, --region, ...).
    evaluation_beam_args: tuple[str, ...] = field(
        default=(), metadata={"flag": "evaluation-beam-arg"}
    )

    max_rmse: float = (
        0.235  # normalised units (the bias baseline is ~0.236, the default model ~0.222)
    )
    min_hit_rate: float = 0.18  # hit@10 over 5-star ratings, seen excluded (popularity ~0.14)
    # The candidate must beat each baseline on its metric by these margins (absolute).
    require_beat_baselines: bool = True
    baseline_hit_rate_margin: float = 0.02  # over popularity's hit@10
    baseline_rmse_margin: float = 0.002  # under the user+item bias model's RMSE
    # Over EASE's hit@10 (item-item, closed form: the strongest simple baseline; it is skipped,
    # and so is its gate, above baselines.EASE_MAX_ITEMS items).
    ease_hit_rate_margin: float = 0.01  # the default model clears it by ~0.03 on ML-100k
    # Against the previously blessed model in the export location (TFX's change threshold).
    max_regression_rmse: float = 0.01
    max_regression_hit_rate: float = 0.02

    def validate(self) -> None:
        if self.max_rmse <= 0:
            raise ConfigError(f"max_rmse must be > 0, got {self.max_rmse}")


# Where the pipeline's pieces live in a cluster; both are overridable from the CLI.
DEFAULT_IMAGE = "ghcr.io/mtrec/mtrec-python:0.1.0"  # built from ./Dockerfile
DEFAULT_SERVING_MODEL_DIR = "/mnt/models"  # the volume a TF Serving deployment reads
# Secret keys exposed as environment by `--secret NAME` (the standard AWS variables s3fs reads).
DEFAULT_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@dataclass(frozen=True)
class KubeflowConfig(_Section):
    """How the compiled pipeline runs on a cluster: image, volumes, secrets, caching, retries,
    resources. Only platform settings: nothing here changes what the pipeline computes."""

    image: str = DEFAULT_IMAGE
    # "NAME=/mount/path": a PersistentVolumeClaim mounted into the tasks that read data or
    # read/write models (ingestion, evaluation, push).
    pvcs: tuple[str, ...] = field(default=(), metadata={"flag": "pvc"})
    # "NAME" or "NAME=KEY,KEY": a Secret whose keys become environment variables of the same
    # names in those tasks (object-store credentials; never in the YAML itself).
    secrets: tuple[str, ...] = field(default=(), metadata={"flag": "secret"})
    enable_caching: bool = True
    retries: int = 2  # on the tasks that touch the network (ingestion, evaluation, push)
    training_cpu: str = "4"
    training_memory: str = "16G"
    gpu_type: str = "nvidia.com/gpu"
    gpu_limit: int = 1  # per training pod (each TFJob worker with training_workers > 1)
    # > 1: the training task launches a TFJob (Kubeflow Training Operator) of this many
    # Worker replicas (pipeline/tfjob.py) instead of training in its own pod.
    training_workers: int = 1
    # Shared storage the TFJob's workers and the launching task all reach (s3://, gs://, or a
    # path under a --pvc mount that is ReadWriteMany): examples in, the chief's model out.
    training_staging: str = ""
    tfjob_timeout_seconds: int = 24 * 3600

    def validate(self) -> None:
        for pvc in self.pvcs:
            name, sep, path = pvc.partition("=")
            if not (name and sep and path.startswith("/")):
                raise ConfigError(f"pvc must be NAME=/mount/path, got {pvc!r}")
        for secret in self.secrets:
            if not secret.partition("=")[0]:
                raise ConfigError(f"secret must be NAME or NAME=KEY,KEY, got {secret!r}")
        if self.retries < 0 or self.gpu_limit < 0:
            raise ConfigError("retries and gpu_limit must be >= 0")
        if self.training_workers < 1:
            raise ConfigError(f"training_workers must be >= 1, got {self.training_workers}")
        if self.training_workers > 1:
            staging = self.training_staging
            on_pvc = any(
                staging.startswith(path.rstrip("/") + "/") for _, path in self.volume_mounts()
            )
            if not (staging.startswith(("s3://", "gs://")) or on_pvc):
                raise ConfigError(
                    "training_workers > 1 needs training_staging: an s3:// or gs:// URI, or a "
                    "path under a --pvc mount, that the TFJob's workers share "
                    f"(got {staging!r})"
                )

    def volume_mounts(self) -> list[tuple[str, str]]:
        return [tuple(p.split("=", 1)) for p in self.pvcs]  # type: ignore[misc]

    def secret_envs(self) -> list[tuple[str, dict[str, str]]]:
        out = []
        for secret in self.secrets:
            name, _, keys = secret.partition("=")
            names = [k.strip() for k in keys.split(",") if k.strip()] or list(DEFAULT_SECRET_KEYS)
            out.append((name, {key: key for key in names}))
        return out


@dataclass(frozen=True)
class PipelineConfig:
    """Everything one pipeline run needs."""

    data_dir: str = ""  # raw ml-100k folder (local, s3:// or gs://); empty = tensorflow-datasets
    output_dir: str = "mtrec-output"
    model_name: str = DEFAULT_MODEL_NAME
    serving_model_dir: str = ""  # where blessed models are pushed; empty = <output_dir>/serving
    # After blessing, refit on train + validation + test with the same settings and push that
    # model (the blessing keeps the evaluated model's figures).
    refit_on_all: bool = False
    ingestion: IngestionConfig = field(default_factory=IngestionConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    gates: GateConfig = field(default_factory=GateConfig)


# The seed notebook's settings: joint model, Adagrad(0.1), batch 1000, 5 epochs, summed in-batch loss,
# rating head Dense(256) -> Dense(128) -> Dense(1), no sampling correction.
SEED_TRAINING = TrainingConfig(
    embedding_dim=32,
    rating_hidden_units=(256, 128),
    rating_product_feature=False,
    use_bias_terms=False,
    embedding_l2=0.0,
    retrieval_weight=1.0,
    ranking_weight=1.0,
    retrieval_loss_reduction="sum",
    temperature=1.0,
    sampling_correction_weight=0.0,
    remove_accidental_hits=False,
    optimizer="adagrad",
    learning_rate=0.1,
    batch_size=1000,
    epochs=5,
    # Later levers, off as in the seed.
    retrieval_negatives="in-batch",
    sampled_negatives=0,
    disliked_retrieval_weight=1.0,
    rerank_pool=0,
    rerank_rating_weight=3.0,
    learning_rate_schedule="constant",
    final_learning_rate_fraction=0.0,
    bias_l2=0.0,
    rating_heads=1,
    ema_momentum=0.0,
)
DEFAULT_TRAINING = TrainingConfig()

# Millions of ratings and vocabularies of 10^5 ids (bench/scale.py, ML-25M's shape): lazy
# embedding updates (a step's cost follows the batch, not the tables) and in-batch negatives at
# batch 1024; the single 64-unit rating head of before the RMSE sweep, no weight averaging (the
# moving average is a dense update of every table each step) and a cosine decay to 0.
LARGE_TRAINING = DEFAULT_TRAINING.replace(
    batch_size=1024,
    retrieval_negatives="in-batch",
    sampled_negatives=0,
    lazy_embedding_updates=True,
    rating_hidden_units=(64,),
    rating_heads=1,
    ranking_weight=10.0,
    bias_l2=0.0,
    ema_momentum=0.0,
    final_learning_rate_fraction=0.0,
    rerank_rating_weight=3.0,
)

TRAINING_PRESETS: dict[str, TrainingConfig] = {
    "default": DEFAULT_TRAINING,
    "seed": SEED_TRAINING,
    "large": LARGE_TRAINING,
}

# The seed's three variants: (ranking_weight, retrieval_weight).
VARIANTS: dict[str, tuple[float, float]] = {
    "rating-only": (1.0, 0.0),
    "retrieval-only": (0.0, 1.0),
    "joint": (1.0, 1.0),
}


def training_preset(name: str) -> TrainingConfig:
    try:
        return TRAINING_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(TRAINING_PRESETS)}") from None
