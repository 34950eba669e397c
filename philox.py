"""The sampler's uniform draws for many rows at once: `uniform_draws`, TensorFlow's Philox-4x32-10 spelled out in
vectorized ops, bit for bit the draw that `reference_draw` makes with TensorFlow's own random ops for one row.

Why: the raw random ops take one seed pair each, so the sampler drew each row's number in a loop over the rows
(tf.map_fn), once per token: with 32 rows, the loop took about half of a block's time without XLA (the export's
batch-32 rate doubled vectorized; docs/export.md has bench/export.py's figures). The same numbers, so sample.py's
text for a seed is unchanged; tests/test_philox.py compares the two on many seeds.

How TensorFlow draws one uniform float from an int64 seed pair [seed, position] (StatelessRandomGetKeyCounter,
then StatelessRandomUniformFullIntV2 for one uint32): the pair, as four 32-bit words, is scrambled by one Philox
block under a fixed key; the block's first two words become the key and its last two the high half of the counter;
the draw is the first word of the Philox block at that key and counter. The sampler keeps the top 23 bits of it.
"""
import tensorflow as tf

PHILOX = 1  # tf.random.Algorithm.PHILOX, the algorithm of the raw random ops
FLOAT32_MANTISSA_BITS = 23
ROUNDS = 10
MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # Philox-4x32's round multipliers
KEY_STEPS = (0x9E3779B9, 0xBB67AE85)  # added to the key after each round (the golden ratio, sqrt(3) - 1)
SCRAMBLE_KEY = (0x3EC8F720, 0x02461E29)  # TensorFlow's fixed key that scrambles a seed pair into key and counter
LOW_32_BITS = 0xFFFFFFFF


def uniform_draws(seeds, positions):
    """Uniform float32 draws in [0, 1), one per element, from int64 seeds and positions of one shape ([rows], or
    [rows, steps] for a block's draws made at once): element i's draw is reference_draw([seeds[i], positions[i]]),
    which keeps only the low 32 bits of each."""
    seed, position = (tf.cast(tf.bitwise.bitwise_and(value, LOW_32_BITS), tf.uint64) for value in (seeds, positions))
    zeros = tf.zeros_like(seed)
    # A seed below 2**32 fills the counter's first and third words; its second and fourth are zero.
    scramble_key = tf.reshape(tf.constant(SCRAMBLE_KEY, tf.uint32), [2] + [1] * seed.shape.rank)
    multiplied, xored = _philox(tf.stack([seed, position]), tf.stack([zeros, zeros]), scramble_key)
    multiplied, xored = tf.unstack(multiplied), tf.unstack(xored)  # the scrambled block's words (0, 2) and (1, 3)
    key = tf.cast(tf.stack([multiplied[0], xored[0]]), tf.uint32)
    bits = tf.unstack(_philox(tf.stack([zeros, multiplied[1]]), tf.stack([zeros, xored[1]]), key)[0])[0]
    mantissa = tf.bitwise.right_shift(bits, tf.constant(32 - FLOAT32_MANTISSA_BITS, tf.uint64))
    return tf.cast(mantissa, tf.float32) * (2.0 ** -FLOAT32_MANTISSA_BITS)


def _philox(multiplied, xored, key):
    """One Philox-4x32-10 block: the counter's words 0 and 2 (`multiplied`, which each round multiplies) and 1 and 3
    (`xored`), each pair [2, ...] of uint64 that hold 32-bit words, and the key's two uint32 words ([2, ...], or
    [2, 1, ...] for every element) -> the block's words as the same two pairs.

    Few ops, because tracing and compiling the sampling block (which a one-off sample.py waits for) take time by
    the op: each round runs both halves of the block as one op per step, on 64-bit words, so that the 32 x 32-bit
    product needs no casts; and the rounds' keys (each the one before plus KEY_STEPS, modulo 2**32) are made at once.
    """
    rounds = tf.constant([[round_ * step % 2 ** 32 for step in KEY_STEPS] for round_ in range(ROUNDS)], tf.uint32)
    keys = tf.unstack(tf.cast(key[tf.newaxis] + tf.reshape(rounds, [ROUNDS, 2] + [1] * (key.shape.rank - 1)),
                              tf.uint64))
    multipliers = tf.reshape(tf.constant(MULTIPLIERS, tf.uint64), [2] + [1] * (multiplied.shape.rank - 1))
    shift, low_bits, first = tf.constant(32, tf.uint64), tf.constant(LOW_32_BITS, tf.uint64), tf.constant([0])
    for key in keys:
        # Words 0 and 2 become high1 ^ word1 ^ key0 and high0 ^ word3 ^ key1; words 1 and 3 become low1 and low0:
        # the products' halves, each pair reversed.
        product = tf.reverse(multipliers * multiplied, first)
        multiplied, xored = tf.bitwise.right_shift(product, shift) ^ xored ^ key, tf.bitwise.bitwise_and(product,
                                                                                                      low_bits)
    return multiplied, xored


def reference_draw(seed_pair):
    """The draw of one int64 seed pair [seed, position] with TensorFlow's own random ops: what the XLA-compiled
    sampler has always drawn (XLA's stateless_uniform keeps only the low 32 bits of each seed element and turns the
    top 23 bits of a Philox draw into the float; TensorFlow's kernel would read all 64 bits and use other bits,
    so the ops are spelled out to draw the same with and without XLA; a consequence kept for that reason: seeds
    that differ only above their low 32 bits draw alike). uniform_draws makes it for many rows."""
    low_bits = tf.bitwise.bitwise_and(seed_pair, tf.constant(LOW_32_BITS, tf.int64))
    key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=low_bits)
    bits = tf.raw_ops.StatelessRandomUniformFullIntV2(shape=[], key=key, counter=counter, alg=PHILOX,
                                                      dtype=tf.uint32)
    mantissa = tf.bitwise.right_shift(bits, tf.constant(32 - FLOAT32_MANTISSA_BITS, tf.uint32))
    return tf.cast(mantissa, tf.float32) * (2.0 ** -FLOAT32_MANTISSA_BITS)
