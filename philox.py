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
    """Uniform float32 draws in [0, 1), one per row, from int64 [rows] seeds and positions: row r's draw is
    reference_draw([seeds[r], positions[r]]), which keeps only the low 32 bits of each."""
    seed, position = (tf.cast(tf.bitwise.bitwise_and(value, LOW_32_BITS), tf.uint32) for value in (seeds, positions))
    zeros = tf.zeros_like(seed)
    # A seed below 2**32 fills the counter's first and third words; its second and fourth are zero.
    scrambled = _philox(tf.stack([seed, position]), tf.stack([zeros, zeros]),
                        tf.constant(SCRAMBLE_KEY, tf.uint32)[:, tf.newaxis])
    multiplied, xored = scrambled  # the words (0, 2) and (1, 3) of the scrambled block
    key = tf.stack([multiplied[0], xored[0]])
    bits = _philox(tf.stack([zeros, multiplied[1]]), tf.stack([zeros, xored[1]]), key)[0][0]
    mantissa = tf.bitwise.right_shift(bits, tf.constant(32 - FLOAT32_MANTISSA_BITS, tf.uint32))
    return tf.cast(mantissa, tf.float32) * (2.0 ** -FLOAT32_MANTISSA_BITS)


def _philox(multiplied, xored, key):
    """One Philox-4x32-10 block over uint32 words, each [2, rows]: the counter's words 0 and 2 (`multiplied`, which
    each round multiplies) and 1 and 3 (`xored`), and the key's two words ([2, rows] or [2, 1]) -> the block's words
    as the same two pairs. Each round runs both halves of the block as one op per step, so that tracing the block
    (which a one-off sample.py waits for) makes a few ops a round, not one per word."""
    multipliers = tf.constant(MULTIPLIERS, tf.uint64)[:, tf.newaxis]
    key_steps = tf.constant(KEY_STEPS, tf.uint32)[:, tf.newaxis]
    shift = tf.constant(32, tf.uint64)
    for round_ in range(ROUNDS):
        if round_:
            key = key + key_steps
        product = multipliers * tf.cast(multiplied, tf.uint64)
        high = tf.cast(tf.bitwise.right_shift(product, shift), tf.uint32)
        low = tf.cast(product, tf.uint32)  # the low 32 bits: a cast to a narrower integer keeps them
        # Words 0 and 2 become high1 ^ word1 ^ key0 and high0 ^ word3 ^ key1; words 1 and 3 become low1 and low0.
        multiplied, xored = tf.reverse(high, [0]) ^ xored ^ key, tf.reverse(low, [0])
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
