import keras
import numpy as np
import pytest
import tensorflow as tf

from components.training.optimizers import LazyAdagrad, LazyAdam, LazySGD, lazy

ROWS = np.array([3, 1, 3, 0], np.int32)  # row 3 twice: its values are summed
VALUES = np.arange(8, dtype=np.float32).reshape(4, 2) / 10 - 0.3
TOUCHED, UNTOUCHED = [0, 1, 3], [2, 4, 5]


def _table(seed=0):
    return keras.Variable(np.random.default_rng(seed).normal(size=(6, 2)).astype(np.float32))


def _dense_gradient(table=None, l2=0.0):
    dense = np.zeros((6, 2), np.float32)
    np.add.at(dense, ROWS, VALUES)
    if l2:  # the row-wise L2: only on the rows the batch touches
        dense[TOUCHED] += 2 * l2 * table.numpy()[TOUCHED]
    return tf.constant(dense)


def _sparse_gradient():
    return tf.IndexedSlices(tf.constant(VALUES), tf.constant(ROWS), tf.constant([6, 2]))


@pytest.mark.parametrize(
    "lazy_cls, dense_cls",
    [
        (LazyAdam, keras.optimizers.Adam),
        (LazyAdagrad, keras.optimizers.Adagrad),
        (LazySGD, keras.optimizers.SGD),
    ],
)
def test_first_lazy_step_equals_the_dense_step_on_touched_rows(lazy_cls, dense_cls):
    """Adam's first step (zero moments), Adagrad and SGD: a row without gradient does not move
    in the dense step either, so the two agree everywhere."""
    sparse_table, dense_table = _table(), _table()
    lazy_opt, dense_opt = lazy_cls(learning_rate=0.1), dense_cls(learning_rate=0.1)
    lazy_opt.apply([_sparse_gradient()], [sparse_table])
    dense_opt.apply([_dense_gradient()], [dense_table])
    np.testing.assert_allclose(sparse_table.numpy(), dense_table.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sparse_table.numpy()[UNTOUCHED], _table().numpy()[UNTOUCHED])


@pytest.mark.parametrize(
    "lazy_cls, dense_cls",
    [(LazyAdagrad, keras.optimizers.Adagrad), (LazySGD, keras.optimizers.SGD)],
)
def test_lazy_steps_equal_dense_steps_with_row_l2(lazy_cls, dense_cls):
    """Several steps with the row-wise L2: the dense optimizer given the same gradient (L2 on
    the touched rows only) ends at the same table, slots included."""
    sparse_table, dense_table = _table(), _table()
    lazy_opt = lazy_cls(learning_rate=0.1, row_l2={sparse_table.path: 0.05})
    dense_opt = dense_cls(learning_rate=0.1)
    for _ in range(3):
        gradient = _dense_gradient(dense_table, l2=0.05)
        lazy_opt.apply([_sparse_gradient()], [sparse_table])
        dense_opt.apply([gradient], [dense_table])
    np.testing.assert_allclose(sparse_table.numpy(), dense_table.numpy(), rtol=1e-5, atol=1e-6)
    for lazy_slot, dense_slot in zip(lazy_opt.variables[2:], dense_opt.variables[2:], strict=True):
        np.testing.assert_allclose(lazy_slot.numpy(), dense_slot.numpy(), rtol=1e-5, atol=1e-6)


def test_lazy_adam_matches_hand_computed_lazy_adam():
    """Steps 2 and 3 of LazyAdam: touched rows follow Adam with the global step's bias
    correction from their own moments; untouched rows and their moments stay as they were."""
    table = _table()
    start = table.numpy().copy()
    opt = LazyAdam(learning_rate=0.1, row_l2={table.path: 0.01})
    m, v, expected = np.zeros((6, 2)), np.zeros((6, 2)), start.astype(np.float64)
    for step, rows in enumerate([ROWS, np.array([1, 1], np.int32), ROWS], start=1):
        values = VALUES[: len(rows)]
        opt.apply(
            [tf.IndexedSlices(tf.constant(values), tf.constant(rows), tf.constant([6, 2]))], [table]
        )
        touched = np.unique(rows)
        g = np.zeros((6, 2))
        np.add.at(g, rows, values)
        g[touched] += 2 * 0.01 * expected[touched]
        m[touched] = 0.9 * m[touched] + 0.1 * g[touched]
        v[touched] = 0.999 * v[touched] + 0.001 * g[touched] ** 2
        alpha = 0.1 * np.sqrt(1 - 0.999**step) / (1 - 0.9**step)
        expected[touched] -= alpha * m[touched] / (np.sqrt(v[touched]) + 1e-7)
        np.testing.assert_allclose(table.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(table.numpy()[[2, 4, 5]], start[[2, 4, 5]])


def test_dense_gradients_take_the_dense_step():
    """A variable whose gradient is dense (a layer's kernel) is updated as Adam does."""
    lazy_var, dense_var = _table(), _table()
    gradient = tf.constant(VALUES[:2].repeat(3, axis=0))
    LazyAdam(learning_rate=0.1).apply([gradient], [lazy_var])
    keras.optimizers.Adam(learning_rate=0.1).apply([gradient], [dense_var])
    np.testing.assert_allclose(lazy_var.numpy(), dense_var.numpy(), rtol=1e-6)


def test_lazy_keeps_settings_and_refuses_what_it_cannot_do():
    schedule = keras.optimizers.schedules.CosineDecay(0.01, 100)
    converted = lazy(keras.optimizers.Adam(schedule, beta_1=0.8), {"t/embeddings": 0.1})
    assert isinstance(converted, LazyAdam) and converted.beta_1 == 0.8
    assert converted.row_l2 == {"t/embeddings": 0.1}
    assert isinstance(converted._learning_rate, keras.optimizers.schedules.CosineDecay)
    with pytest.raises(ValueError, match="weight decay"):
        lazy(keras.optimizers.Adagrad(0.01, weight_decay=0.1), {})
    with pytest.raises(ValueError, match="no lazy form of RMSprop"):
        lazy(keras.optimizers.RMSprop(0.01), {})
    with pytest.raises(ValueError, match="amsgrad"):
        LazyAdam(0.01, amsgrad=True)
