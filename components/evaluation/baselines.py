"""Non-learned and closed-form baselines that the evaluation stage scores in the same run.

A candidate model is only worth blessing if it beats these on the same split: the popularity
ranking and EASE (a strong item-item linear model) for retrieval, and the global mean and a
regularised bias model for the rating head. Plain numpy, so they cost seconds and need no
TensorFlow.
"""

from __future__ import annotations

import numpy as np

from components.features import PADDING_ID

# Chosen on ML-100k (seeded 80/20 split, normalised ratings) with bench/baselines.py: RMSE is
# flat for regs in 1..5 (0.2338 +- 0.0001) and worse at 0 (0.2345) or 25 (0.2373).
DEFAULT_USER_REG = 5.0
DEFAULT_ITEM_REG = 2.0

# Cells of the [users, candidates] seen-mask built per chunk in `popularity_top_k`.
_CHUNK_CELLS = 1 << 24

# EASE holds dense [items, items] matrices and costs ~items^3 flops per lambda tried: on 2 cores,
# 11.8k items took minutes and 5.9 GB (bench/scale.py at 1M rows). Above this, skip it (ML-1M's
# 3.7k items fit; ML-10M's 10.7k do not).
EASE_MAX_ITEMS = 5_000
# The grid EASE's lambda is chosen from on validation (ML-100k's best is in 200..800).
EASE_LAMBDAS = (50.0, 100.0, 200.0, 350.0, 500.0, 800.0, 1200.0, 2000.0)


def popularity_ranking(train_movies: np.ndarray) -> np.ndarray:
    """Movies seen in training, most rated first, ties by lower id; the padding id is excluded."""
    movies = np.asarray(train_movies, dtype=np.int64).ravel()
    if movies.size == 0:
        return np.zeros(0, dtype=np.int64)
    if movies.min() < 0:
        raise ValueError("movie ids must be >= 0")
    counts = np.bincount(movies)
    counts[PADDING_ID] = 0
    ids = np.flatnonzero(counts)
    # lexsort: last key is primary. Descending count, then ascending id.
    return ids[np.lexsort((ids, -counts[ids]))]


def popularity_top_k(
    train_users: np.ndarray,
    train_movies: np.ndarray,
    num_rows: int,
    k: int,
    exclude_seen: bool = True,
    seen: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Top-k most rated training movies per user row [num_rows, k], padded with 0. The movies
    skipped are the (users, movies) pairs of `seen` when given, else the training pairs.

    With `exclude_seen`, a user's top k are the first k unseen movies of the global ranking, so
    they lie within the first k + |seen| ranks; users are processed in chunks (heaviest last) over
    that prefix only, which keeps memory bounded at ML-25M sizes.
    """
    if k <= 0 or num_rows < 0:
        raise ValueError(f"k must be > 0 and num_rows >= 0, got k={k}, num_rows={num_rows}")
    users = np.asarray(train_users, dtype=np.int64).ravel()
    movies = np.asarray(train_movies, dtype=np.int64).ravel()
    if users.shape != movies.shape:
        raise ValueError("train_users and train_movies must have the same length")
    ranking = popularity_ranking(movies)
    n_cand = ranking.size
    if seen is not None:
        users = np.asarray(seen[0], dtype=np.int64).ravel()
        movies = np.asarray(seen[1], dtype=np.int64).ravel()
    out = np.zeros((num_rows, k), dtype=np.int64)
    head = ranking[:k]
    out[:, : head.size] = head
    if not exclude_seen or n_cand == 0 or num_rows == 0:
        return out

    # Position of every movie in the global ranking (n_cand for non-candidates).
    position = np.full(
        max(int(movies.max(initial=0)), int(ranking.max(initial=0))) + 1, n_cand, dtype=np.int64
    )
    position[ranking] = np.arange(n_cand)
    in_rows = (users >= 0) & (users < num_rows)
    pair_user = users[in_rows]
    pair_pos = position[movies[in_rows]]
    keep = pair_pos < n_cand
    pair_user, pair_pos = pair_user[keep], pair_pos[keep]
    if pair_user.size == 0:
        return out
    # Only seen movies inside the user's own prefix matter.
    seen_count = np.bincount(pair_user, minlength=num_rows)
    order = np.argsort(pair_user, kind="stable")  # group pairs by user
    pair_user, pair_pos = pair_user[order], pair_pos[order]
    starts = np.concatenate([[0], np.cumsum(seen_count)])

    active = np.flatnonzero(seen_count)
    active = active[np.argsort(seen_count[active], kind="stable")]
    i = 0
    while i < active.size:
        # Users are sorted by seen count, so a chunk's last user needs the widest prefix: take
        # the most users whose count * (prefix width of the last one) fits the cell budget.
        widths = np.minimum(n_cand, k + seen_count[active[i:]])
        cells = np.arange(1, widths.size + 1) * widths
        rows = max(1, int(np.searchsorted(cells, _CHUNK_CELLS, side="right")))
        chunk = active[i : i + rows]
        width = int(widths[chunk.size - 1])
        seen = np.zeros((chunk.size, width), dtype=bool)
        lens = seen_count[chunk]
        local = np.repeat(np.arange(chunk.size), lens)
        # Gather each chunk user's seen positions without a Python loop over users.
        offsets = np.repeat(starts[chunk] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        idx = np.arange(int(lens.sum())) + offsets
        pos = pair_pos[idx]
        inside = pos < width
        seen[local[inside], pos[inside]] = True
        # The first k unseen prefix positions, in ranking order (row-major nonzero keeps it).
        unseen = ~seen
        slot = np.cumsum(unseen, axis=1, dtype=np.int32) - 1
        row, col = np.nonzero(unseen & (slot < k))
        fill = np.zeros((chunk.size, k), dtype=np.int64)
        fill[row, slot[row, col]] = ranking[col]
        out[chunk] = fill
        i += chunk.size
    return out


def global_mean_predict(train_ratings: np.ndarray, n: int) -> np.ndarray:
    """Predict the training mean for `n` rows: the floor any rating model must clear."""
    ratings = np.asarray(train_ratings, dtype=np.float64).ravel()
    if ratings.size == 0:
        raise ValueError("global mean of an empty training set")
    return np.full(int(n), float(ratings.mean()), dtype=np.float64)


class BiasModel:
    """Regularised bias model r = mu + b_user + b_movie, fitted by alternating closed-form sweeps.

    Each sweep solves the ridge problem for one side given the other exactly (ALS with rank 0),
    so a handful of sweeps converge. A strong rating baseline that needs no training loop.
    """

    def __init__(
        self,
        user_reg: float = DEFAULT_USER_REG,
        item_reg: float = DEFAULT_ITEM_REG,
        n_sweeps: int = 10,
        clip_min: float | None = 0.0,
        clip_max: float | None = 1.0,
    ) -> None:
        if user_reg < 0 or item_reg < 0:
            raise ValueError("regularisation must be >= 0")
        if n_sweeps <= 0:
            raise ValueError("n_sweeps must be > 0")
        self.user_reg = float(user_reg)
        self.item_reg = float(item_reg)
        self.n_sweeps = int(n_sweeps)
        self.clip_min = clip_min
        self.clip_max = clip_max
        self.mu = 0.0
        self.user_bias = np.zeros(0, dtype=np.float64)
        self.item_bias = np.zeros(0, dtype=np.float64)

    def fit(self, users: np.ndarray, movies: np.ndarray, ratings: np.ndarray) -> BiasModel:
        """Fit mu, then alternate user and movie biases (bincount sums, no loop over rows)."""
        u = np.asarray(users, dtype=np.int64).ravel()
        m = np.asarray(movies, dtype=np.int64).ravel()
        r = np.asarray(ratings, dtype=np.float64).ravel()
        if not u.shape == m.shape == r.shape:
            raise ValueError("users, movies and ratings must have the same length")
        if r.size == 0:
            raise ValueError("cannot fit on an empty training set")
        if u.min() < 0 or m.min() < 0:
            raise ValueError("ids must be >= 0")
        n_u, n_m = int(u.max()) + 1, int(m.max()) + 1
        self.mu = float(r.mean())
        resid = r - self.mu
        user_count = np.bincount(u, minlength=n_u)
        item_count = np.bincount(m, minlength=n_m)
        b_u = np.zeros(n_u)
        b_i = np.zeros(n_m)
        for _ in range(self.n_sweeps):
            b_u = _ridge_mean(u, resid - b_i[m], user_count, self.user_reg)
            b_i = _ridge_mean(m, resid - b_u[u], item_count, self.item_reg)
        self.user_bias, self.item_bias = b_u, b_i
        return self

    def predict(self, users: np.ndarray, movies: np.ndarray) -> np.ndarray:
        """Predict ratings; ids unseen in training get bias 0, results clipped to the bounds."""
        u = np.asarray(users, dtype=np.int64).ravel()
        m = np.asarray(movies, dtype=np.int64).ravel()
        pred = self.mu + _lookup(self.user_bias, u) + _lookup(self.item_bias, m)
        if self.clip_min is not None or self.clip_max is not None:
            pred = np.clip(pred, self.clip_min, self.clip_max)
        return pred


def bias_item_sweeps(
    item_count: np.ndarray,
    item_residual: np.ndarray,
    user_terms: np.ndarray,
    user_gram: np.ndarray,
    n_sweeps: int,
    item_reg: float = DEFAULT_ITEM_REG,
) -> tuple[np.ndarray, np.ndarray]:
    """`BiasModel.fit`'s movie biases after n_sweeps - 1 and n_sweeps sweeps, from catalogue-sized
    sums alone (the Beam evaluation's bounded-stage fit): with w_u = 1 / (n_u + user_reg) and c_ui
    user u's ratings of movie i, a sweep is b <- (S_i - T_i + G b) / (n_i + item_reg), where
    S_i = `item_residual` (sum of r - mu), T_i = `user_terms` (sum_u c_ui w_u sum_u(r - mu)) and
    G = `user_gram` (sum_u w_u c_u c_u^T). A user's bias is then (sum_u(r - mu) - c_u b_prev) w_u."""
    denom = np.asarray(item_count, dtype=np.float64) + item_reg
    b = np.zeros(denom.size)
    previous = b
    for _ in range(n_sweeps):
        previous = b
        sums = item_residual - user_terms + user_gram @ b
        b = np.divide(sums, denom, out=np.zeros_like(sums), where=denom > 0)
    return previous, b


def _ridge_mean(ids: np.ndarray, values: np.ndarray, counts: np.ndarray, reg: float) -> np.ndarray:
    """Per-id sum(values) / (count + reg): the L2-regularised least-squares bias."""
    sums = np.bincount(ids, weights=values, minlength=counts.size)
    denom = counts + reg
    return np.divide(sums, denom, out=np.zeros_like(sums), where=denom > 0)


def _lookup(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    known = (ids >= 0) & (ids < table.size)
    out = np.zeros(ids.shape, dtype=np.float64)
    out[known] = table[ids[known]]
    return out


def ease_skip_reason(num_items: int, max_items: int = EASE_MAX_ITEMS) -> str | None:
    """Why EASE cannot run on this catalogue (None when it can)."""
    if num_items > max_items:
        return (
            f"EASE skipped: {num_items} items exceed the limit of {max_items} "
            f"(its dense item-item matrix would need {num_items**2 * 8 / 1e9:.1f} GB)"
        )
    return None


def choose_by_validation(scores: dict[float, float]) -> float:
    """The hyperparameter with the best validation score; ties go to the larger value (the more
    regularised one for EASE's lambda), so the choice is deterministic."""
    if not scores:
        raise ValueError("no validation scores to choose from")
    return max(scores, key=lambda value: (scores[value], value))


def _interactions(users: np.ndarray, movies: np.ndarray, num_rows: int, num_items: int):
    x = np.zeros((num_rows, num_items), dtype=np.float64)
    u = np.asarray(users, dtype=np.int64).ravel()
    m = np.asarray(movies, dtype=np.int64).ravel()
    if u.shape != m.shape:
        raise ValueError("users and movies must have the same length")
    x[u, m] = 1.0
    return x


def _top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Row-wise indices of the k best scores, best first (ties: lower index first)."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    # Rows with fewer than k scorable items: pad with the padding id (never a hit).
    return np.where(np.isneginf(np.take_along_axis(scores, top, axis=1)), PADDING_ID, top)


class EASE:
    """EASE (Steck 2019): item-item weights B = I - P diagMat(1/diag(P)), P = (X^T X + lam I)^-1
    over the binary user x item matrix X, diagonal forced to 0. Scores are X B.

    `fit_gram` eigendecomposes X^T X once, so `set_lambda` re-solves for any lambda in
    O(items^3) matrix products without refitting (how the validation grid stays cheap).
    """

    def __init__(self, lam: float = 500.0, max_items: int = EASE_MAX_ITEMS) -> None:
        if lam <= 0:
            raise ValueError(f"lambda must be > 0, got {lam}")
        self.lam = float(lam)
        self.max_items = int(max_items)
        self.num_items = 0
        self._x = np.zeros((0, 0))
        self._eigen: tuple[np.ndarray, np.ndarray] | None = None
        self.weights = np.zeros((0, 0))

    def fit(self, users: np.ndarray, movies: np.ndarray, num_rows: int, num_items: int) -> EASE:
        """Fit on the (user, movie) pairs the user rated (any rating counts as an interaction)."""
        reason = ease_skip_reason(num_items, self.max_items)
        if reason:
            raise ValueError(reason)
        self._x = _interactions(users, movies, num_rows, num_items)
        return self.fit_gram(self._x.T @ self._x)

    def fit_gram(self, gram: np.ndarray) -> EASE:
        """Fit on the item-item Gram matrix X^T X alone (what the Beam evaluation sums over
        batches of users; binary X makes it exact integers, whatever the order)."""
        reason = ease_skip_reason(gram.shape[0], self.max_items)
        if reason:
            raise ValueError(reason)
        self.num_items = int(gram.shape[0])
        eigenvalues, eigenvectors = np.linalg.eigh(gram)
        self._eigen = (np.maximum(eigenvalues, 0.0), eigenvectors)
        return self.set_lambda(self.lam)

    def set_lambda(self, lam: float) -> EASE:
        if self._eigen is None:
            raise ValueError("fit first")
        if lam <= 0:
            raise ValueError(f"lambda must be > 0, got {lam}")
        self.lam = float(lam)
        self.weights = self.weights_for(lam)
        return self

    def weights_for(self, lam: float) -> np.ndarray:
        """B for one lambda, without changing the fitted object (safe to share between threads)."""
        if self._eigen is None:
            raise ValueError("fit first")
        eigenvalues, eigenvectors = self._eigen
        # V diag(1 / (e + lam)) V^T as S S^T with S = V / sqrt(e + lam): numpy runs a product
        # with its own transpose as one symmetric rank-k update, half a general product's work.
        scaled = eigenvectors / np.sqrt(eigenvalues + float(lam))
        p = scaled @ scaled.T
        b = -p / np.diag(p)
        b[np.diag_indices_from(b)] = 0.0
        return b

    def top_k(
        self,
        k: int,
        exclude_users: np.ndarray | None = None,
        exclude_movies: np.ndarray | None = None,
    ) -> np.ndarray:
        """[num_rows, k] movie ids per user row from the fitted history; the padding id, movies
        nobody rated in training and the given (user, movie) pairs are never recommended."""
        return ease_top_k(
            self._x, self.weights, k, self._x.sum(axis=0) == 0, exclude_users, exclude_movies
        )


def ease_top_k(
    x: np.ndarray,
    weights: np.ndarray,
    k: int,
    not_candidate: np.ndarray,
    exclude_rows: np.ndarray | None = None,
    exclude_movies: np.ndarray | None = None,
) -> np.ndarray:
    """EASE's top k for the users whose binary histories are the rows of `x`: X B with each
    row's own movies, the non-candidates (no training rating), the padding id and the given
    (row, movie) pairs masked. One definition for the whole matrix and for a batch of users."""
    scores = x @ weights
    scores[x > 0] = -np.inf
    scores[:, not_candidate] = -np.inf
    scores[:, PADDING_ID] = -np.inf
    if exclude_rows is not None and exclude_movies is not None:
        scores[np.asarray(exclude_rows, np.int64), np.asarray(exclude_movies, np.int64)] = -np.inf
    return _top_k_rows(scores, k)
