"""philox.py: the vectorized draws are bit for bit those of TensorFlow's own random ops, row by row (so sample.py's
text for a seed is what it was), with and without XLA."""
import numpy as np
import tensorflow as tf

from philox import reference_draw, uniform_draws

ROWS = 2000


def test_the_vectorized_draws_are_tensorflows_own_draws_bit_for_bit():
    rng = np.random.default_rng(0)
    edges = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 9, 2 ** 63 - 1]  # the low 32 bits count, and only they
    seeds = np.concatenate([rng.integers(0, 2 ** 63 - 1, ROWS), edges]).astype(np.int64)
    positions = np.concatenate([rng.integers(0, 2 ** 31 - 1, ROWS), edges[::-1]]).astype(np.int64)
    expected = tf.map_fn(reference_draw, tf.stack([seeds, positions], axis=1), fn_output_signature=tf.float32)
    for jit_compile in (False, True):
        draws = tf.function(uniform_draws, jit_compile=jit_compile)(tf.constant(seeds), tf.constant(positions))
        np.testing.assert_array_equal(draws.numpy(), expected.numpy())
        # A block's draws, made at once: [rows, steps] in, the same draws in that shape out.
        block = tf.function(uniform_draws, jit_compile=jit_compile)(tf.constant(seeds.reshape(2, -1)),
                                                                     tf.constant(positions.reshape(2, -1)))
        np.testing.assert_array_equal(block.numpy(), expected.numpy().reshape(2, -1))
    assert 0.0 <= expected.numpy().min() and expected.numpy().max() < 1.0
    assert len(np.unique(expected.numpy())) > ROWS * 0.99  # draws, not a constant
