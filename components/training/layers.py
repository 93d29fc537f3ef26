"""The Keras layers the recommender is built from: excluding top-k retrieval, averaged rating
heads, a table embedding with row-sparse gradients, and a numerically stable row logsumexp.
"""

import keras
import keras_rs
import tensorflow as tf
from keras import ops

EXCLUDED_SCORE = -1e9  # score given to excluded candidates before top-k
NO_MOVIE = -1  # returned id when fewer than k candidates remain after exclusion


class ExcludingBruteForceRetrieval(keras_rs.layers.BruteForceRetrieval):
    """keras-rs brute-force top-k that can skip, per query, candidates marked as excluded
    (movies the user already rated). Excluded slots never come back as recommendations: when
    fewer than k candidates remain, the tail is filled with id -1 and score -inf."""

    def call(self, inputs, excluded=None, k: int | None = None):
        k = k or self.k
        scores = self.compute_score(inputs, self.candidate_embeddings)
        if excluded is not None:
            scores = ops.where(excluded, EXCLUDED_SCORE, scores)
        top_scores, top_index = ops.top_k(scores, k=k)
        top_ids = ops.take(self.candidate_ids, top_index, axis=0)
        missing = top_scores <= EXCLUDED_SCORE / 2
        top_ids = ops.where(missing, NO_MOVIE, top_ids)
        top_scores = ops.where(missing, float("-inf"), top_scores)
        return top_scores, top_ids


class AveragedHeads(keras.layers.Layer):
    """The mean of `heads` one-hidden-layer rating MLPs (Dense(units, relu) -> Dense(1)), an
    ensemble inside the model, held as one hidden kernel [d, heads * units] and one output
    kernel: 4 variables however many heads. Why: each variable costs the optimizer (and its
    weight average) update ops of its own; at 5 heads, 20 variables made `mtrec train` on
    ML-100k ~4 s slower (tracing them, then running them each step). Each head's block starts
    with the values its own Dense would draw, and a head's units feed only its own output
    weights, so this trains as the average of separate heads does."""

    def __init__(self, heads: int, units: int, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.heads = heads
        self.units = units
        self.dropout = keras.layers.Dropout(dropout) if dropout else None  # per unit
        # One Glorot initializer per head and layer, made in the order separate heads make
        # theirs (each draws its seed when made): the same initial values and the same random
        # stream for everything after, as `heads` Dense(units) -> Dense(1) stacks.
        self._initializers = [
            (keras.initializers.GlorotUniform(), keras.initializers.GlorotUniform())
            for _ in range(heads)
        ]

    def build(self, input_shape):
        width = input_shape[-1]
        hidden_values = [h((width, self.units)) for h, _ in self._initializers]
        output_values = [o((self.units, 1)) for _, o in self._initializers]
        hidden = self.heads * self.units
        self.kernel = self.add_weight(
            shape=(width, hidden),
            initializer=lambda shape, dtype=None: ops.concatenate(hidden_values, axis=1),
            name="kernel",
        )
        self.bias = self.add_weight(shape=(hidden,), initializer="zeros", name="bias")
        self.out_kernel = self.add_weight(
            shape=(hidden, 1),
            initializer=lambda shape, dtype=None: ops.concatenate(output_values, axis=0),
            name="out_kernel",
        )
        self.out_bias = self.add_weight(shape=(), initializer="zeros", name="out_bias")

    def call(self, inputs, training: bool = False):
        hidden = ops.relu(ops.matmul(inputs, self.kernel) + self.bias)
        if self.dropout is not None:
            hidden = self.dropout(hidden, training=training)
        return ops.matmul(hidden, self.out_kernel)[:, 0] / self.heads + self.out_bias


class TableEmbedding(keras.layers.Embedding):
    """`keras.layers.Embedding` that reads only the rows it looks up (a resource gather).
    Keras's reads the whole table as a tensor first, which TensorFlow turns into a copy of the
    table on every step once the variable has had a sparse update (lazy embedding updates):
    ~8% of a step at ML-25M's shape."""

    def call(self, inputs):
        if inputs.dtype not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        return tf.gather(self.embeddings.value, inputs)


@tf.custom_gradient
def row_logsumexp(logits):
    """logsumexp over axis 1 of a [rows, columns] matrix, in fewer passes over it than
    `ops.logsumexp`: the backward pass reuses the forward exponentials (softmax = e / sum)."""
    top = tf.stop_gradient(tf.reduce_max(logits, axis=1, keepdims=True))
    e = tf.exp(logits - top)
    total = tf.reduce_sum(e, axis=1, keepdims=True)

    def grad(upstream):
        return e * (upstream[:, None] / total)

    return tf.math.log(total[:, 0]) + top[:, 0], grad
