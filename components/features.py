"""Column, feature and signature names shared by every stage, the model and the server.

One place, so Beam, tf.data, the Keras model and the serving signatures cannot drift apart.
"""

# Columns of a rating row after ingestion (and features of a tf.train.Example after preprocessing).
USER_ID = "user_id"
MOVIE_ID = "movie_id"
RATING = "rating"  # normalised to [0, 1]: (stars - 1) / 4
STARS = "stars"  # the raw 1..5 rating
TIMESTAMP = "timestamp"

# The seed's scale (ML-100k: 1..5 stars). Data sets bring their own: ingestion finds the range
# in the data, preprocessing normalises by it, and the model's `stars` outputs undo it.
DEFAULT_STARS_RANGE = (1.0, 5.0)

# Index 0 of the user and movie tables is the out-of-vocabulary row: never a candidate.
PADDING_ID = 0

# Files inside artifacts.
RATINGS_FILE = (
    "ratings.tsv"  # ingestion output: user \t movie \t stars \t timestamp (u.data format)
)
MOVIES_FILE = "movies.tsv"  # ingestion output: movie_id \t title
INGESTION_REPORT = "ingestion.json"
TRAIN_SPLIT = "train"
VALIDATION_SPLIT = "validation"  # carved from train: curves and early stopping, never the test
TEST_SPLIT = "test"  # read once, by evaluation
SPLITS = (TRAIN_SPLIT, VALIDATION_SPLIT, TEST_SPLIT)
STATS_FILE = "stats.json"  # preprocessing output: counts and id ranges
DEAD_LETTER_PREFIX = "dead_letter"
REJECTED_DIR = "rejected"  # dead letters of a failed preprocessing run (no examples beside them)
HISTORY_FILE = "history.json"  # training output: per-epoch train and validation metrics
METRICS_FILE = "metrics.json"  # evaluation output: model, baselines and previous model
BLESSING_FILE = "blessing.json"  # evaluation output: gates and verdict
INFRA_BLESSING_FILE = "infra_blessing.json"  # infra-validation output: checks and verdict

# The model's name in TF Serving's layout (<base>/<name>/<version>/) unless the user names it.
DEFAULT_MODEL_NAME = "mtrec"

# Serving signatures of the exported SavedModel.
SIGNATURE_RETRIEVE = "serving_default"  # user_id -> top-k movie_ids, scores; rated movies excluded
SIGNATURE_RETRIEVE_EXCLUDING = "retrieve_excluding"  # user_id + excluded_movie_ids -> top-k
SIGNATURE_RANK = "rank"  # (user_id, movie_id) -> rating in [0, 1], stars in [1, 5]
SIGNATURE_RETRIEVE_K = "retrieve_k"  # user_id + scalar k -> top-k, rated movies excluded
K = "k"  # scalar int32 input of retrieve_k: how many movies per user
MAX_REQUEST_K = 100  # largest k a request may ask of retrieve_k
EXCLUDED_MOVIE_IDS = "excluded_movie_ids"  # [batch, n] raw ids, padded with -1 or ""
OUT_MOVIE_IDS = "movie_ids"
OUT_SCORES = "scores"
OUT_RATING = "rating"
OUT_STARS = "stars"
OUT_COLD_START = "cold_start"  # per row of the retrieval signatures: the user is unknown


def normalise_stars(stars: float, stars_range: tuple[float, float] = DEFAULT_STARS_RANGE) -> float:
    """Map a star rating to [0, 1] over the data set's range (1..5 stars -> (s - 1) / 4, as the
    seed does)."""
    low, high = stars_range
    return (stars - low) / (high - low)


def denormalise_rating(rating, stars_range: tuple[float, float] = DEFAULT_STARS_RANGE):
    """Inverse of `normalise_stars` (works on floats and arrays)."""
    low, high = stars_range
    return rating * (high - low) + low
