"""Lazy (row-wise) optimizers for the embedding tables (`lazy_embedding_updates`).

Keras 3's optimizers update a whole variable every step: for an embedding table that is every
row and, for Adam, both moment slots (162k users x 32 floats, three times, at ML-25M's shape),
even though a batch looks up a few thousand rows. Here a gradient that arrives as
`tf.IndexedSlices` (what TensorFlow gives for a table read with a gather) updates only the rows
it names, variable and slots alike, after summing the values of repeated indices; any other
gradient takes the optimizer's own dense step. The L2 penalty of those tables becomes row-wise as
well: `row_l2[variable path]` adds 2 * l2 * row to the gradient of each row the batch touches
(a Keras regularizer on the whole table makes its gradient dense).

What that changes, per optimizer:
- SGD and Adagrad: a row the batch does not touch has a zero gradient, which the dense step
  leaves unchanged too; the lazy step equals the dense step (with the L2 of untouched rows
  dropped).
- Adam: LazyAdam (TF Addons): an untouched row's moments are not decayed and the row does not
  move on its stale momentum; touched rows follow Adam's update with the global step's bias
  correction.
"""

from typing import Any

import keras
import tensorflow as tf


class _LazyRows:
    """Mixin for a Keras optimizer on the TensorFlow backend (see the module docstring)."""

    def __init__(self, *args: Any, row_l2: dict[str, float] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.row_l2 = {str(k): float(v) for k, v in (row_l2 or {}).items()}

    def get_config(self) -> dict:
        return super().get_config() | {"row_l2": dict(self.row_l2)}

    # What reached `update_step` per variable path, recorded when the step is traced: under a
    # multi-worker strategy it shows whether the all-reduce kept the tables' gradients as
    # IndexedSlices (all-gathered rows) or densified them (distributed.py reports it).
    gradient_kinds: dict[str, str]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        kinds = self.__dict__.setdefault("gradient_kinds", {})
        kinds[self._trainable_variables[index].path] = type(gradient).__name__
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        table = variable.value if isinstance(variable, keras.Variable) else variable
        rows, position = tf.unique(gradient.indices)
        values = tf.math.unsorted_segment_sum(
            tf.cast(gradient.values, table.dtype), position, tf.shape(rows)[0]
        )
        current = tf.gather(table, rows)
        l2 = self.row_l2.get(self._trainable_variables[index].path, 0.0)
        if l2:
            values = values + 2.0 * l2 * current
        updated = self._rows_step(index, rows, values, current, tf.cast(learning_rate, table.dtype))
        table.scatter_update(tf.IndexedSlices(updated, rows))

    def _rows_step(self, index, rows, gradient, current, learning_rate):
        """The new values of `rows` (their slots updated in place)."""
        raise NotImplementedError


def _gather(slot, rows):
    return tf.gather(slot.value if isinstance(slot, keras.Variable) else slot, rows)


class LazyAdam(_LazyRows, keras.optimizers.Adam):
    """Adam whose embedding tables (IndexedSlices gradients) update only the rows a batch uses."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.amsgrad:
            raise ValueError("LazyAdam: amsgrad is not supported")

    def _rows_step(self, index, rows, gradient, current, learning_rate):
        dtype = current.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        alpha = learning_rate * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        m_slot, v_slot = self._momentums[index], self._velocities[index]
        m = _gather(m_slot, rows)
        v = _gather(v_slot, rows)
        m = m + (gradient - m) * (1 - beta_1)
        v = v + (tf.square(gradient) - v) * (1 - beta_2)
        self.assign(m_slot, tf.IndexedSlices(m, rows))
        self.assign(v_slot, tf.IndexedSlices(v, rows))
        return current - alpha * m / (tf.sqrt(v) + self.epsilon)


class LazyAdagrad(_LazyRows, keras.optimizers.Adagrad):
    """Adagrad whose embedding tables update only the rows a batch uses (the dense step leaves
    the others unchanged as well)."""

    def _rows_step(self, index, rows, gradient, current, learning_rate):
        slot = self._accumulators[index]
        accumulator = _gather(slot, rows) + tf.square(gradient)
        self.assign(slot, tf.IndexedSlices(accumulator, rows))
        return current - learning_rate * gradient / tf.sqrt(accumulator + self.epsilon)


class LazySGD(_LazyRows, keras.optimizers.SGD):
    """Plain SGD (no momentum) whose embedding tables update only the rows a batch uses."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.momentum:
            raise ValueError("LazySGD: momentum is not supported")

    def _rows_step(self, index, rows, gradient, current, learning_rate):
        return current - learning_rate * gradient


LAZY = {
    keras.optimizers.Adam: LazyAdam,
    keras.optimizers.Adagrad: LazyAdagrad,
    keras.optimizers.SGD: LazySGD,
}


def lazy(
    optimizer: keras.optimizers.Optimizer, row_l2: dict[str, float]
) -> keras.optimizers.Optimizer:
    """The lazy counterpart of `optimizer` (same settings), with row-wise L2 per table path."""
    if optimizer.weight_decay:
        raise ValueError("lazy embedding updates: weight decay would decay whole tables every step")
    if type(optimizer) in LAZY.values():
        cls = type(optimizer)
    elif type(optimizer) in LAZY:
        cls = LAZY[type(optimizer)]
    else:
        raise ValueError(
            f"lazy embedding updates: no lazy form of {type(optimizer).__name__} "
            f"(supported: {', '.join(c.__name__ for c in LAZY)})"
        )
    return cls.from_config(optimizer.get_config() | {"row_l2": row_l2})
