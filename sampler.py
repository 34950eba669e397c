"""Sampling: the choice of the next token, the compiled generator, and text in, text out around them (what
sample.py and the sampling server share).

Generator: the whole sampling loop (prime, then n tokens) as one compiled TensorFlow function over tensors.
Sampler.load(save_dir) restores a save dir; sampler.run(SampleSettings(...)) checks every setting, turns the prime
into ids (refusing unknown tokens by name), runs the generator and returns the prime followed by the generated
text; sampler.sample(prime, n, ...) is the same with the settings as arguments.
"""
import secrets

import numpy as np
import tensorflow as tf

import savedir
from cli import FLOAT32_MAX, FLOAT32_TINY, in_float32_range
from settings import MODE_SAMPLE, MODE_SAMPLE_ON_SPACES, SAMPLE_MODES, SampleSettings
from utils import NEWLINE, encode_tokens, join_tokens, normalize_newlines, tokenize

GENERATE_BLOCK = 128  # tokens per XLA-compiled block of the sampling loop
PHILOX = 1  # tf.random.Algorithm.PHILOX, the algorithm of the raw random ops
FLOAT32_MANTISSA_BITS = 23
MAX_SEED = 2 ** 63 - 1
MAX_N = 2 ** 30  # the generator counts tokens in int32
# An empty prime starts the model from a line break (from token id 0, the most frequent token, when the
# vocabulary has no line break): text then begins as if at the start of a line.
EMPTY_PRIME_START = NEWLINE


class GenerationStopped(Exception):
    """generator.stop() was called (the server is shutting down) before the n tokens asked for were made."""


def keep_top_k(logits, top_k):
    """Mask all but the top_k largest logits to -inf (all kept when top_k is 0)."""
    def masked():
        k = tf.minimum(top_k, tf.shape(logits)[0])
        kth_largest = tf.gather(tf.sort(logits, direction="DESCENDING"), k - 1)
        return tf.where(logits < kth_largest, tf.constant(-float("inf"), logits.dtype), logits)
    return tf.cond(top_k > 0, masked, lambda: logits)


def uniform_draw(step_seed):
    """One uniform float32 in [0, 1) from an int64 seed pair [seed, position]: the draw the XLA-compiled
    sampler has always made with tf.random.stateless_uniform, spelled out so that it is the same without XLA.

    Why: compiled by XLA on the CPU, stateless_uniform's auto-selected algorithm keeps only the low 32 bits of
    each seed element and turns the top 23 bits of a Philox draw into the float; TensorFlow's own kernel reads
    all 64 bits and makes the float from other bits, so the same seed drew other numbers compiled and not. Spelled
    out with the raw ops, the compiled Generator draws exactly what it drew before (sample.py's text for a seed
    is unchanged) and the exported, uncompiled graph (export.py) draws the same. A consequence kept for that
    reason: seeds that differ only above their low 32 bits draw alike.
    """
    low_bits = tf.bitwise.bitwise_and(step_seed, tf.constant(0xFFFFFFFF, tf.int64))
    key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=low_bits)
    bits = tf.raw_ops.StatelessRandomUniformFullIntV2(shape=[], key=key, counter=counter, alg=PHILOX,
                                                      dtype=tf.uint32)
    mantissa = tf.bitwise.right_shift(bits, tf.constant(32 - FLOAT32_MANTISSA_BITS, tf.uint32))
    return tf.cast(mantissa, tf.float32) * (2.0 ** -FLOAT32_MANTISSA_BITS)


def choose_next(logits, previous, step_seed, temperature, mode, top_k, space_id):
    """Pick the next token id from logits [vocab] (see Generator.generate for the arguments)."""
    # The largest logit is subtracted first, so that a tiny temperature cannot overflow to inf - inf = NaN.
    scaled = keep_top_k((logits - tf.reduce_max(logits)) / temperature, top_k)
    # Inverse CDF: one uniform draw u in [0, total) and the first token whose cumulative weight exceeds it; a
    # token of weight 0 (masked by top_k) is never chosen. Unlike stateless_categorical it compiles with XLA
    # on the CPU. The index is capped at the last token of positive weight, should rounding make u reach the
    # total: never one past the vocabulary, as the original's weighted_pick could be. The draw is the same with
    # and without XLA (see uniform_draw).
    weights = tf.exp(scaled - tf.reduce_max(scaled))
    cumulative = tf.cumsum(weights)
    u = uniform_draw(step_seed) * cumulative[-1]
    last_possible = tf.reduce_max(tf.where(weights > 0, tf.range(tf.shape(weights)[0]), 0))
    sampled = tf.minimum(tf.reduce_sum(tf.cast(cumulative <= u, tf.int32)), last_possible)
    greedy = tf.argmax(logits, output_type=tf.int32)
    sample_here = tf.logical_or(tf.equal(mode, MODE_SAMPLE),
                                tf.logical_and(tf.equal(mode, MODE_SAMPLE_ON_SPACES), tf.equal(previous, space_id)))
    return tf.where(sample_here, sampled, greedy)


class Generator(tf.Module):
    """Compiled sampling over one CharRNN; holds no Python state, so one instance serves many threads.

    The token loop runs in blocks of GENERATE_BLOCK steps, each compiled by XLA into one fused program (a
    per-token graph loop spends most of its time dispatching small ops); a graph loop runs the blocks.
    """

    def __init__(self, model, space_id=-1, jit_compile=True):
        """space_id: the id of " " (mode 2 samples after it; -1 when there is none). jit_compile=False builds the
        blocks as plain TensorFlow ops, for a graph that must run where XLA does not (export.py): the same draws,
        and the same math up to the last bits of rounding."""
        super().__init__(name="generator")
        self.model = model
        self.space_id = tf.constant(space_id, tf.int32)
        # Set by stop() from any thread; the block loop reads it before each block (one read per block).
        self.stopped = tf.Variable(False, trainable=False, name="stopped")
        self._block = tf.function(self._generate_block, jit_compile=jit_compile)

    def stop(self):
        """Make every generate() call, running or later, stop before its next block: it then returns fewer
        than n ids (those of the blocks already made). For a server that is shutting down; there is no undo."""
        self.stopped.assign(True)

    def _generate_block(self, position, previous, logits, states, temperature, mode, seed, top_k):
        """GENERATE_BLOCK more tokens from (previous token, its logits, states); returns them and the new carry."""
        tokens = tf.TensorArray(tf.int32, size=GENERATE_BLOCK)
        # A small vocabulary's first-layer input products cost less, once per block, than one product per token.
        table = self.model.input_projection_table() if self.model.vocab_size <= GENERATE_BLOCK else None

        def body(i, previous, logits, states, tokens):
            step_seed = tf.stack([seed, tf.cast(position + i, tf.int64)])
            token = choose_next(logits, previous, step_seed, temperature, mode, top_k, self.space_id)
            next_logits, next_states = self.model.step(token[tf.newaxis], states, table)
            return i + 1, token, next_logits[0], next_states, tokens.write(i, token)

        _, previous, logits, states, tokens = tf.while_loop(
            lambda i, *_: i < GENERATE_BLOCK, body, (tf.constant(0), previous, logits, states, tokens))
        return tokens.stack(), previous, logits, states

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.int32, name="prime"),
        tf.TensorSpec([], tf.int32, name="n"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int32, name="mode"),
        tf.TensorSpec([], tf.int64, name="seed"),
        tf.TensorSpec([], tf.int32, name="top_k"),
    ])
    def generate(self, prime, n, temperature, mode, seed, top_k):
        """Feed the prime ids (at least one), then generate n ids; returns int32 [n], or the ids of the blocks
        made so far (fewer than n) once stop() was called.

        mode: 0 argmax, 1 sample every step, 2 sample only right after a space. temperature divides the
        logits; top_k > 0 samples among the k likeliest tokens only; seed makes the draw repeatable.
        """
        logits, states = self.model(prime[tf.newaxis], self.model.zero_state(1))
        num_blocks = (n + GENERATE_BLOCK - 1) // GENERATE_BLOCK
        blocks = tf.TensorArray(tf.int32, size=num_blocks, element_shape=[GENERATE_BLOCK])

        def body(b, previous, logits, states, blocks):
            tokens, previous, logits, states = self._block(b * GENERATE_BLOCK, previous, logits, states,
                                                           temperature, mode, seed, top_k)
            return b + 1, previous, logits, states, blocks.write(b, tokens)

        def more(b, *_):
            return tf.logical_and(b < num_blocks, tf.logical_not(self.stopped.read_value()))

        made, _, _, _, blocks = tf.while_loop(more, body,
                                              (tf.constant(0), prime[-1], logits[0, -1], states, blocks))
        # Blocks a stop left unmade concatenate as zeros (the element shape is fixed); the slice drops them.
        return blocks.concat()[:tf.minimum(n, made * GENERATE_BLOCK)]


class Sampler:
    """A restored model and its vocabulary, ready to generate text; safe to share between threads."""

    def __init__(self, loaded, jit_compile=True):
        """loaded: a savedir.Loaded; jit_compile=False for a generator without XLA (see Generator)."""
        self.config, self.vocab, self.unk_token = loaded.config, loaded.vocab, loaded.unk_token
        self.word_level = bool(self.config["word_level"])
        self.index = {token: i for i, token in enumerate(self.vocab)}
        self.generator = Generator(loaded.model, space_id=self.index.get(" ", -1), jit_compile=jit_compile)
        self.start_id = self.index.get(EMPTY_PRIME_START, 0)
        self.keep_crlf = savedir.keeps_crlf(self.config, self.vocab)

    @classmethod
    def load(cls, save_dir, word_level_flag=False):
        """Restore save_dir (see savedir.load) and build its sampler.

        word_level_flag is the old --word_level flag: the level comes from the saved config, the flag only warns.
        """
        sampler = cls(savedir.load(save_dir))
        if word_level_flag and not sampler.word_level:
            savedir.warn("--word_level ignored: this model was trained at character level")
        return sampler

    def encode(self, prime):
        """Prime text -> token ids; unknown tokens map to the unknown-word token, or are refused by name."""
        return self._encode_normalized(normalize_newlines(prime, self.keep_crlf))

    def _encode_normalized(self, prime):
        return encode_tokens(tokenize(prime, self.word_level), self.index, self.unk_token, self.word_level,
                             what="the prime")

    def run(self, settings):
        """The prime followed by settings.n generated tokens, as text (settings: a SampleSettings).

        Bad settings raise ValueError; a stop of the generator (see Generator.stop) before the n tokens were
        made raises GenerationStopped.
        """
        check_settings(settings)
        prime = normalize_newlines(settings.prime, self.keep_crlf)
        ids = self._encode_normalized(prime) or [self.start_id]
        mode = settings.mode
        if self.word_level and mode == MODE_SAMPLE_ON_SPACES:
            mode = MODE_SAMPLE  # every word follows a space, so "sample on spaces" samples at every step
        seed = secrets.randbelow(MAX_SEED) if settings.seed is None else settings.seed
        n = settings.n
        generated = self.generator.generate(tf.constant(ids, tf.int32), tf.constant(n, tf.int32),
                                            tf.constant(settings.temperature, tf.float32),
                                            tf.constant(mode, tf.int32), tf.constant(seed, tf.int64),
                                            tf.constant(settings.top_k, tf.int32))
        if generated.shape[0] < n:
            raise GenerationStopped(f"the generation was stopped after {generated.shape[0]} of {n} tokens")
        return self.join(prime, [self.vocab[i] for i in generated.numpy()])

    def sample(self, *args, **kwargs):
        """run(SampleSettings(prime, n, mode, temperature, seed, top_k)): the settings given as arguments."""
        return self.run(SampleSettings(*args, **kwargs))

    def join(self, prime, tokens):
        """The prime followed by generated tokens, as the original printed them."""
        text = join_tokens(tokens, self.word_level)
        if self.word_level and prime and text and not prime[-1].isspace() and text[0] != NEWLINE:
            return prime + " " + text  # words are joined by single spaces, line breaks stand alone
        return prime + text


def check_settings(settings):
    """Raise ValueError with a one-line reason when a sampling setting is out of range."""
    n, mode, temperature, seed, top_k = settings.n, settings.mode, settings.temperature, settings.seed, settings.top_k
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= MAX_N:
        raise ValueError(f"n must be an integer from 0 to {MAX_N}, got {n!r}")
    if mode not in SAMPLE_MODES:
        modes = ", ".join(f"{number} ({name})" for number, name in SAMPLE_MODES.items())
        raise ValueError(f"sample mode must be one of {modes}, got {mode!r}")
    if not (isinstance(temperature, (int, float)) and in_float32_range(temperature)):
        raise ValueError(f"temperature must be a number from {FLOAT32_TINY:.2g} to {FLOAT32_MAX:.2g}, "
                         f"got {temperature!r}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if not 0 <= top_k <= MAX_N:  # top_k goes to the generator as int32, which would wrap larger values
        raise ValueError(f"top_k must be an integer from 0 to {MAX_N} (0 keeps every token), got {top_k!r}")
