"""The rating head as a recommendation runs it, frozen at index time from the trained weights."""

import keras
import tensorflow as tf

from components.training.layers import AveragedHeads

# Largest per-movie hidden-layer table a recommendation reads instead of multiplying (float32):
# 1,682 movies x 5 heads x 256 units is 8.6 MB; bigger catalogues multiply per candidate.
MAX_RATING_TABLE_BYTES = 64 * 2**20


class FusedRatingHead(tf.Module):
    """The one-hidden-layer rating head(s) as a recommendation runs them, frozen from
    the trained weights by `index_candidates` (and exported with the model).

    Why: re-ranking scores `rerank_pool` movies per user, and the heads' hidden layer was most
    of a served retrieve (a [20, 64] x [64, 1280] matmul per request). Here the hidden layer's kernel is split by input block: the user's part is
    computed once per user instead of once per movie, and the movie's part is read from a
    per-movie table (up to MAX_RATING_TABLE_BYTES; larger catalogues multiply per movie). Same
    values as `Recommender.rating`, to float rounding."""

    def __init__(self, model: keras.Model, max_table_bytes: int = MAX_RATING_TABLE_BYTES):
        super().__init__(name="fused_rating_head")
        head = model.rating_head
        if isinstance(head, AveragedHeads):
            kernel, bias = head.kernel.numpy(), head.bias.numpy()
            out_kernel = head.out_kernel.numpy() / head.heads
            out_bias = float(head.out_bias.numpy())
        else:  # one head with one hidden layer
            hidden, output = head.layers[0], head.layers[-1]
            kernel, bias = hidden.kernel.numpy(), hidden.bias.numpy()
            out_kernel, out_bias = output.kernel.numpy(), float(output.bias.numpy()[0])
        dim = model.config.embedding_dim + model.config.rating_embedding_dim
        self.product = model.config.rating_product_feature
        self.use_bias_terms = model.config.use_bias_terms
        self.user_kernel = tf.Variable(kernel[:dim], trainable=False, name="user_kernel")
        if self.product:
            self.product_kernel = tf.Variable(kernel[2 * dim :], trainable=False, name="product")
        self.movie_table = None
        movie_kernel = kernel[dim : 2 * dim]
        if model.num_movies * kernel.shape[1] * 4 <= max_table_bytes:
            ids = tf.range(model.num_movies)
            movies = model.rating_movie(ids, model.movie_vector(ids)).numpy()
            self.movie_table = tf.Variable(movies @ movie_kernel + bias, trainable=False)
        else:
            self.movie_kernel = tf.Variable(movie_kernel, trainable=False, name="movie_kernel")
            self.bias = tf.Variable(bias, trainable=False, name="bias")
        self.out_kernel = tf.Variable(out_kernel, trainable=False, name="out_kernel")
        self.out_bias = tf.constant(out_bias)

    def __call__(self, model: keras.Model, user_ids, movie_ids, user, repeats: int):
        """Ratings (before clipping) of movie_ids [batch * repeats], `repeats` per user
        (user_ids [batch], user: their tower vectors [batch, d])."""
        user = model.rating_user(user_ids, user)
        movie = None
        if self.movie_table is None or self.product:
            movie = model.rating_movie(movie_ids, model.movie_vector(movie_ids))
        if self.movie_table is not None:
            hidden = tf.gather(self.movie_table, movie_ids)
        else:
            hidden = tf.matmul(movie, self.movie_kernel) + self.bias
        if self.product:
            product = _per_user(movie, user, repeats, tf.multiply)
            hidden += tf.matmul(product, self.product_kernel)
        hidden = _per_user(hidden, tf.matmul(user, self.user_kernel), repeats, tf.add)
        rating = tf.matmul(tf.nn.relu(hidden), self.out_kernel)[:, 0] + self.out_bias
        if self.use_bias_terms:
            rating = _per_user(rating, model.user_bias(user_ids)[:, 0], repeats, tf.add)
            rating += model.movie_bias(movie_ids)[:, 0]
        return rating


def _per_user(rows, per_user, repeats: int, combine):
    """combine(rows, each user's value) for rows [batch * repeats, ...] that come `repeats` per
    user, per_user [batch, ...]: broadcast over a reshape, not tf.repeat (a dozen ops each)."""
    if repeats == 1:
        return combine(rows, per_user)
    shape = tf.shape(rows)
    grouped = tf.reshape(rows, tf.concat([[-1, repeats], shape[1:]], axis=0))
    return tf.reshape(combine(grouped, tf.expand_dims(per_user, 1)), shape)
