"""Sampling: the choice of the next token, the compiled generator, and text in, text out around them (what
sample.py and the sampling server share).

Generator: the whole sampling loop (prime, then n tokens) as one compiled TensorFlow function over tensors.
Sampler.load(save_dir) restores a save dir; sampler.run(SampleSettings(...)) checks every setting, turns the prime
into ids (refusing unknown tokens by name), runs the generator and returns the prime followed by the generated
text; sampler.sample(prime, n, ...) is the same with the settings as arguments.
"""
import dataclasses
import threading
from typing import NamedTuple

import numpy as np
import tensorflow as tf

import savedir
from errors import GenerationStopped
from philox import uniform_draws
from prime_states import PrimeStates
from runtime import warn
from sample_text import SampleText
from settings import (
    MAX_LOGPROBS,
    MAX_SEED,
    MODE_SAMPLE,
    MODE_SAMPLE_ON_SPACES,
    SETTINGS,
    SampleSettings,
    check_beam_width,
    check_settings,
    check_stops,
    pick_seed,
)
from utils import NEWLINE, encode_tokens, join_tokens, normalize_newlines, tokenize

GENERATE_BLOCK = 128  # tokens per XLA-compiled block of the sampling loop; the first block of a sample
LONGEST_BLOCK = 8192  # the most tokens of a block of Generator.blocks, which a long sample's blocks grow to
PRIMES_KEPT = 256  # how many primes' states feed_prime keeps (the most recently used)
# An empty prime starts the model from a line break (from token id 0, the most frequent token, when the
# vocabulary has no line break): text then begins as if at the start of a line.
EMPTY_PRIME_START = NEWLINE
# The settings that reach the generator with one value per row (the prime reaches it as ids, n as the number of
# steps): choose_next reads them by name from a dict of [rows] tensors, the rows' settings.
ROW_SETTINGS = tuple(setting for setting in SETTINGS if setting.dtype is not None and setting.name != "n")


def row_settings(samples):
    """The generator's settings of rows that sample these SampleSettings (their mode and seed the ones drawn
    with, see Sampler.prepare): {name: numpy [rows] of the setting's dtype}."""
    return {setting.name: np.array([getattr(sample, setting.name) for sample in samples], setting.dtype)
            for setting in ROW_SETTINGS}


def row_specs(rows):
    """The TensorSpecs of row_settings' dict for `rows` rows (None: any number)."""
    return {setting.name: tf.TensorSpec([rows], setting.dtype) for setting in ROW_SETTINGS}


class BlockScores(NamedTuple):
    """What a scored block reports of each token it made (Generator.batch_block with scored): the token's
    log-probability [rows, GENERATE_BLOCK] and the likeliest tokens' ids and log-probabilities [rows, GENERATE_BLOCK,
    min(MAX_LOGPROBS, vocab)], likeliest first, all under the model's softmax at temperature 1 (see score)."""
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray

    def row(self, row, steps):
        """Row `row`'s scores of its first `steps` tokens (SampleText.add takes them)."""
        return BlockScores(self.logprobs[row, :steps], self.top_ids[row, :steps], self.top_logprobs[row, :steps])


def penalize(logits, counts, frequency_penalty, presence_penalty):
    """OpenAI's frequency and presence penalties: logits [rows, vocab] lowered by counts x frequency_penalty +
    (counts > 0) x presence_penalty, each row by its own counts [rows, vocab] (int32: the tokens it generated so far)
    and penalties [rows]. A row without penalties keeps its logits exactly (x - 0 is x). The blocks run this only
    when some row has a penalty (see has_penalty), so that a sample without them is what it always was, as fast."""
    counted = tf.cast(counts, logits.dtype)
    present = tf.cast(counts > 0, logits.dtype)
    return logits - counted * frequency_penalty[:, tf.newaxis] - present * presence_penalty[:, tf.newaxis]


def has_penalty(settings):
    """Whether some row of the rows' settings (row_settings: numpy arrays by name) has a frequency or presence
    penalty, as a Python bool. The blocks count tokens and penalize only then (in a graph: Generator.graph_block)."""
    return bool(np.any(settings["frequency_penalty"]) or np.any(settings["presence_penalty"]))


def score(logits, token, top):
    """The log-probability [rows] of each row's token under softmax(logits) (logits [rows, vocab], at temperature
    1: the model's own distribution), and the `top` likeliest tokens' ids and log-probabilities [rows, top],
    likeliest first."""
    log_probabilities = tf.nn.log_softmax(logits)
    top_logprobs, top_ids = tf.math.top_k(log_probabilities, k=top)
    return tf.gather(log_probabilities, token, batch_dims=1), top_ids, top_logprobs


def block_schedule(n):
    """The blocks that make n tokens, as Generator.blocks runs them: yields (position, steps) for each. The first
    block makes GENERATE_BLOCK tokens, each next one twice as many as the one before, up to LONGEST_BLOCK, and the
    last one only the tokens left.

    Why: the first text is printed after one short block, and a stop string ends a sample at most one block after
    it appears, however long n is; but each block is a call from Python that costs about as much as 128 tokens of a
    2 x 32 model, and a long sample in blocks of 128 ran at less than half the speed of one in blocks of thousands.
    All the blocks run one compiled program (its output has room for LONGEST_BLOCK tokens), so the growing sizes
    compile nothing more, and the draws depend on the seed and the position only, so they change no text.
    Measured in docs/performance.md (Long samples).
    """
    position, steps = 0, GENERATE_BLOCK
    while position < n:
        yield position, min(steps, n - position)
        position += steps
        steps = min(2 * steps, LONGEST_BLOCK)


def block_draws(seeds, positions, steps):
    """The uniform draws [rows, steps] of a block whose row r draws with seeds[r] (int64 [rows]) from token
    positions[r] (int64 [rows]) on: the draw of token position p is that of the seed pair [seed, p], whatever block
    makes it, so that the text of a seed does not depend on how a sample is cut into blocks. The same with and
    without XLA (see philox.py); made at once before a block's loop, so that the loop's step neither runs nor
    traces them one token at a time."""
    positions = positions[:, tf.newaxis] + tf.range(steps, dtype=tf.int64)
    return uniform_draws(seeds[:, tf.newaxis] + tf.zeros_like(positions), positions)


def keep_top_k_top_p(logits, top_k, top_p):
    """logits [rows, vocab]: mask to -inf, in each row, all but its top_k[r] largest logits (all kept where top_k
    is 0), then every token outside the smallest set of the likeliest tokens left whose probabilities add up to at
    least top_p[r] (all kept where top_p is 1); tokens tied with the least likely one kept are kept too. One sort
    serves both, in one condition: fewer ops for the block to trace and compile."""
    def masked():
        vocab = tf.shape(logits)[-1]
        ordered = tf.sort(logits, direction="DESCENDING")
        k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)  # k = vocab keeps every token
        kth_largest = tf.gather(ordered, k - 1, batch_dims=1)[:, tf.newaxis]
        minus_infinity = tf.constant(-float("inf"), logits.dtype)
        ordered = tf.where(ordered < kth_largest, minus_infinity, ordered)  # the top k, still in order
        likelier = tf.cumsum(tf.nn.softmax(ordered), axis=-1, exclusive=True)  # the probability before each
        kept = tf.reduce_sum(tf.cast(likelier < top_p[:, tf.newaxis], tf.int32), axis=-1)  # at least 1
        threshold = tf.gather(ordered, kept - 1, batch_dims=1)[:, tf.newaxis]
        cut = tf.logical_or(logits < kth_largest,
                            tf.logical_and(logits < threshold, top_p[:, tf.newaxis] < 1.0))  # top_p 1: no cut
        return tf.where(cut, minus_infinity, logits)
    return tf.cond(tf.logical_or(tf.reduce_any(top_k > 0), tf.reduce_any(top_p < 1.0)), masked, lambda: logits)


def choose_next(logits, previous, draws, settings, space_id, counts=None):
    """Pick the next token id of each row from logits [rows, vocab]: settings holds the rows' settings by name
    (ROW_SETTINGS; see Generator.generate for what each means), each a [rows] vector; row r samples with the
    uniform draw draws[r] (block_draws: the draw of its seed and its token's position); counts [rows, vocab] are the
    tokens each row generated so far, for the penalties (None: no row has one, see has_penalty). The rows share no
    arithmetic: each row's choice is what it would be alone."""
    temperature, mode = settings["temperature"], settings["mode"]
    top_k, top_p = settings["top_k"], settings["top_p"]
    # The penalties first, on the logits that every mode reads (argmax too), as OpenAI applies them.
    if counts is not None:
        logits = penalize(logits, counts, settings["frequency_penalty"], settings["presence_penalty"])
    # The largest logit is subtracted first, so that a tiny temperature cannot overflow to inf - inf = NaN. Then
    # top-k, then top-p over the k kept (the order of Hugging Face's and llama.cpp's samplers).
    scaled = (logits - tf.reduce_max(logits, axis=-1, keepdims=True)) / temperature[:, tf.newaxis]
    scaled = keep_top_k_top_p(scaled, top_k, top_p)
    # Inverse CDF: one uniform draw u in [0, total) and the first token whose cumulative weight exceeds it; a
    # token of weight 0 (masked by top_k) is never chosen. Unlike stateless_categorical it compiles with XLA
    # on the CPU. The index is capped at the last token of positive weight, should rounding make u reach the
    # total: never one past the vocabulary, as the original's weighted_pick could be.
    weights = tf.exp(scaled - tf.reduce_max(scaled, axis=-1, keepdims=True))
    cumulative = tf.cumsum(weights, axis=-1)
    u = draws * cumulative[:, -1]
    vocab_ids = tf.range(tf.shape(weights)[-1])[tf.newaxis]
    last_possible = tf.reduce_max(tf.where(weights > 0, vocab_ids, 0), axis=-1)
    sampled = tf.minimum(tf.reduce_sum(tf.cast(cumulative <= u[:, tf.newaxis], tf.int32), axis=-1), last_possible)
    greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
    sample_here = tf.logical_or(tf.equal(mode, MODE_SAMPLE),
                                tf.logical_and(tf.equal(mode, MODE_SAMPLE_ON_SPACES), tf.equal(previous, space_id)))
    return tf.where(sample_here, sampled, greedy)


class Generator(tf.Module):
    """Compiled sampling over one CharRNN; one instance serves many threads (its only Python state, the primes'
    states it keeps, is locked).

    The token loop runs in blocks of steps, each compiled by XLA into one fused program (a per-token graph loop
    spends most of its time dispatching small ops): generate() runs blocks of GENERATE_BLOCK steps in a graph loop,
    blocks() growing ones from a Python loop (see block_schedule).
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
        # The code spells out its loops and conditions (tf.while_loop, tf.cond): without AutoGraph's conversion,
        # tracing takes a fifth of the time, which a one-off sample.py feels.
        # reduce_retracing: one trace serves every row count (XLA still compiles each shape). generate() and the
        # export run it (graph_block); blocks() and the batching server run the packed block below.
        self._block = tf.function(self._generate_block, jit_compile=jit_compile, autograph=False,
                                  reduce_retracing=True)
        self._prime_pass = tf.function(self._feed_prime, autograph=False,
                                       input_signature=[tf.TensorSpec([None], tf.int32)])
        self._primes = PrimeStates(PRIMES_KEPT)
        self._packed_block = tf.function(self._generate_packed_block, jit_compile=jit_compile, autograph=False)
        # The same block that also scores each token (BlockScores), run only when some row asks for logprobs: the
        # block without them stays as fast as it was.
        self._scored_packed_block = tf.function(self._generate_scored_packed_block, jit_compile=jit_compile,
                                                autograph=False)
        self._packed_block_calls = {}  # their concrete functions by (scored, capacity, penalized), made when first used
        self._packed_block_lock = threading.Lock()
        self._compiled = set()  # the (scored, capacity, penalized, rows) of the blocks run so far

    def stop(self):
        """Make every generate() call, running or later, stop before its next block: it then returns fewer
        than n ids (those of the blocks already made). For a server that is shutting down; there is no undo."""
        self.stopped.assign(True)

    def weights_changed(self):
        """Forget the states kept for the primes fed so far: call after assigning new weights to the model (as
        train_samples.py does before each sample while training), or a prime fed again would start from the
        states of the old weights."""
        self._primes.clear()

    def _feed_prime(self, prime):
        """Run the prime ids through the model, one `step` at a time: (its last id, the logits after it [vocab],
        the states, each [1, size]). A graph loop of the step that the blocks run, so that a prime's state is the
        same whichever way it is fed (sample.py, the server, the export)."""
        table = self.model.step_table()

        def body(i, logits, states):
            logits, states = self.model.step(prime[i][tf.newaxis], states, table)
            return i + 1, logits, states

        _, logits, states = tf.while_loop(
            lambda i, *_: i < tf.shape(prime)[0], body,
            (tf.constant(0), tf.zeros([1, self.model.vocab_size]), self.model.zero_state(1)))
        return prime[-1], logits[0], states

    def _generate_block(self, steps, positions, previous, logits, states, counts, settings, scored=False,
                        capacity=GENERATE_BLOCK, penalized=False):
        """`steps` (at most `capacity`, a Python int) more tokens for each row of (previous token [rows], its logits
        [rows, vocab], states, counts [rows, vocab] of the tokens it generated so far): row r is at token
        positions[r] of its sample and draws with its settings, the r-th values of the dict `settings`
        (ROW_SETTINGS by name, each a vector over the rows, so that the rows of a batch may be different requests).
        Returns the tokens [rows, capacity] (the first `steps` columns made, the rest zeros), the new carry
        and, when scored, each token's scores (BlockScores' tensors, before the penalties: see score). The rows
        share the model's matrix products only: each row's choice depends on its own logits and settings alone.
        penalized (a Python bool): apply the rows' penalties and count the tokens; without, the counts come back
        as they came (give True when some row has a penalty: has_penalty)."""
        top = min(MAX_LOGPROBS, self.model.vocab_size)
        rows = tf.shape(previous)
        with_top = tf.concat([rows, [top]], axis=0)
        made_kinds = ((tf.int32, rows),) + (((tf.float32, rows), (tf.int32, with_top), (tf.float32, with_top))
                                             if scored else ())
        # What each step makes (its token, and its scores), as TensorLists with the elements' shape given: XLA
        # then compiles the loop's body once. With TensorArrays, whose element shape is unknown to it, XLA compiled
        # the body twice (first to find the shape), which was most of what a one-off sample.py waited for after
        # the import.
        outputs = tuple(tf.raw_ops.TensorListReserve(element_shape=shape, num_elements=capacity, element_dtype=dtype)
                        for dtype, shape in made_kinds)
        table = self.model.step_table()  # a small vocabulary's first-layer products, once per block
        draws = block_draws(settings["seed"], tf.cast(positions, tf.int64), capacity)

        def body(i, previous, logits, states, outputs, *counted):
            token = choose_next(logits, previous, tf.gather(draws, i, axis=1), settings, self.space_id, *counted)
            made = (token, *score(logits, token, top)) if scored else (token,)
            next_logits, next_states = self.model.step(token, states, table)
            counted = tuple(counts + tf.one_hot(token, self.model.vocab_size, dtype=tf.int32) for counts in counted)
            return (i + 1, token, next_logits, next_states,
                    tuple(tf.raw_ops.TensorListSetItem(input_handle=output, index=i, item=value)
                          for output, value in zip(outputs, made)), *counted)

        _, previous, logits, states, outputs, *counted = tf.while_loop(
            lambda i, *_: i < steps, body,
            (tf.constant(0), previous, logits, states, outputs) + ((counts,) if penalized else ()))
        counts = counted[0] if penalized else counts
        # [capacity, rows, ...] (zeros after the steps made) -> [rows, capacity, ...]
        made = tuple(tf.experimental.numpy.swapaxes(tf.raw_ops.TensorListStack(
            input_handle=output, element_shape=shape, element_dtype=dtype), 0, 1)
            for output, (dtype, shape) in zip(outputs, made_kinds))
        return made[0], previous, logits, states, counts, made[1:]

    def graph_block(self, steps, positions, previous, logits, states, counts, settings):
        """One compiled block (GENERATE_BLOCK tokens of room) inside a graph, for generate() and the export's
        batched signature: the block without the penalties' arithmetic unless some row has a penalty (one check a
        block, not a step). Returns the tokens [rows, GENERATE_BLOCK] and the new previous, logits, states and
        counts."""
        def block(penalized):
            return lambda: self._block(steps, positions, previous, logits, states, counts, settings,
                                       penalized=penalized)[:5]
        penalized = tf.reduce_any(tf.logical_or(tf.not_equal(settings["frequency_penalty"], 0.0),
                                                tf.not_equal(settings["presence_penalty"], 0.0)))
        return tf.cond(penalized, block(True), block(False))

    def _generate_packed_block(self, steps, positions, previous, logits, states, counts, settings, capacity,
                               penalized):
        """_generate_block with the states side by side in one [rows, num_states x size] tensor, in and out."""
        return self._packed(steps, positions, previous, logits, states, counts, settings, False, capacity, penalized)

    def _generate_scored_packed_block(self, steps, positions, previous, logits, states, counts, settings, capacity,
                                      penalized):
        """_generate_packed_block that also scores each token (BlockScores)."""
        return self._packed(steps, positions, previous, logits, states, counts, settings, True, capacity, penalized)

    def _packed(self, steps, positions, previous, logits, states, counts, settings, scored, capacity, penalized):
        states = tuple(tf.split(states, self.model.num_states, axis=1))
        tokens, previous, logits, states, counts, scores = self._generate_block(
            steps, positions, previous, logits, states, counts, settings, scored, capacity, penalized)
        return tokens, previous, logits, tf.concat(states, axis=1), counts, scores

    def batch_block(self, steps, positions, previous, logits, states, counts, settings, scored=False,
                    capacity=GENERATE_BLOCK):
        """One compiled block of `steps` tokens (at most `capacity`) over rows that may be different requests,
        for the batching server and blocks(): numpy in and out, and the states side by side in one array. The
        arguments: int32 [rows] positions and previous, float32 [rows, vocab] logits, float32 [rows, num_states x
        size] states, int32 [rows, vocab] counts of the tokens each row generated so far, then the rows' settings
        (row_settings: a dict of [rows] arrays, by name); scored: also score each token (logprobs); capacity: the
        most steps the block has room for (GENERATE_BLOCK for the batching server, whose blocks are short;
        LONGEST_BLOCK for blocks(), whose blocks grow: see block_schedule). Returns (tokens [rows, capacity], of
        which the first `steps` columns are made; previous, logits, states, counts; BlockScores when scored, else
        None). XLA compiles it once per row count, scored, capacity and penalized (whether some row has a
        penalty: has_penalty; without, the counts come back as they came).

        Why the packing and a concrete function: each call from Python into TensorFlow lets go of the GIL and
        takes it back, and while the server's request threads run Python, each taking back waits for them (up to
        the interpreter's switch interval). Beside three threads running Python, a block of 16 rows took 316 to
        373 ms called the plain way and 45 to 49 ms this way (32 to 36 ms with nothing beside it)."""
        penalized = has_penalty(settings)
        with self._packed_block_lock:
            if (scored, capacity, penalized) not in self._packed_block_calls:
                rows, vocab = [None], self.model.vocab_size
                block = self._scored_packed_block if scored else self._packed_block
                self._packed_block_calls[scored, capacity, penalized] = block.get_concrete_function(
                    tf.TensorSpec([], tf.int32), tf.TensorSpec(rows, tf.int32), tf.TensorSpec(rows, tf.int32),
                    tf.TensorSpec(rows + [vocab], tf.float32),
                    tf.TensorSpec(rows + [self.model.num_states * self.model.rnn_size], tf.float32),
                    tf.TensorSpec(rows + [vocab], tf.int32), row_specs(None), capacity, penalized)
        *outputs, scores = self._packed_block_calls[scored, capacity, penalized](
            tf.constant(steps, tf.int32),
            *(tf.constant(value) for value in (positions, previous, logits, states, counts)),
            {name: tf.constant(value) for name, value in settings.items()}, capacity, penalized)
        self._compiled.add((scored, capacity, penalized, len(positions)))  # XLA compiles once per row count
        return (*(output.numpy() for output in outputs),
                BlockScores(*(score.numpy() for score in scores)) if scored else None)

    def feed_prime(self, prime):
        """Run the prime ids (a list, at least one) through the model: (its last id, the logits after it [vocab],
        the states, each [1, size]), as an int and read-only float32 numpy arrays. Traced once for all prime
        lengths; it releases the GIL while it runs, so that the server's request threads feed their primes side by
        side. The results for the PRIMES_KEPT primes fed last are kept, and given again for the same prime."""
        key = np.asarray(prime, np.int32).tobytes()
        fed = self._primes.get(key)
        if fed is None:
            previous, logits, states = self._prime_pass(tf.constant(prime, tf.int32))
            fed = int(previous), logits.numpy(), tuple(state.numpy() for state in states)
            for array in (fed[1], *fed[2]):
                array.setflags(write=False)
            self._primes.put(key, fed)
        return fed

    def blocks(self, prime, n, settings, rows=1):
        """generate(), block by block as they are made, for the SampleSettings `settings` (its mode and seed those
        drawn with, see Sampler.prepare; its prime and n are not read): yields (an int32 numpy array of ids, their
        BlockScores when settings.logprobs > 0, else None) a block, n ids in all (fewer once stop() was called), as block_schedule sizes the blocks (GENERATE_BLOCK ids first,
        growing to LONGEST_BLOCK). The same ids as generate(); the loop over the blocks is Python's, so nothing but
        one block is traced and compiled (quicker to start), and the caller sees each block at once (to print it,
        or to stop at a stop string).

        rows > 1: that many samples of the prime at once, row r drawing with seed + r (so row 0 is the sample of
        settings.seed alone); each block's ids are then [rows, ids] (and its scores those of every row).
        """
        scored = settings.logprobs > 0
        seed, settings = settings.seed, row_settings([settings] * rows)
        settings["seed"] = np.array([(seed + row) % (MAX_SEED + 1) for row in range(rows)], np.int64)
        compiling = self._compile_beside(rows, settings, scored, LONGEST_BLOCK)
        previous, logits, states = self.feed_prime(prime)
        if compiling is not None:
            compiling.join()
        # numpy in and out, through batch_block's concrete function: a request of a server without batching makes
        # one TensorFlow call per block and a few array copies, where each eager op it made before cost a call
        # (and, beside the server's other threads, a wait for the GIL: see batch_block).
        carry = (np.full(rows, previous, np.int32), np.repeat(logits[np.newaxis], rows, axis=0),
                 np.repeat(np.concatenate(states, axis=1), rows, axis=0),
                 np.zeros((rows, self.model.vocab_size), np.int32))  # the penalties count generated tokens only
        # A block's first k tokens do not depend on how many steps it makes: each block makes the steps that
        # block_schedule gives it (the last one only the steps left), all with one compiled program.
        for position, steps in block_schedule(n):
            if self.stopped.numpy():
                return
            tokens, *carry, scores = self.batch_block(steps, np.full(rows, position, np.int32), *carry, settings,
                                                      scored, LONGEST_BLOCK)
            if rows == 1:
                yield tokens[0, :steps], None if scores is None else scores.row(0, steps)
            else:
                yield tokens[:, :steps], None if scores is None else BlockScores(
                    *(score[:, :steps] for score in scores))

    def _compile_beside(self, rows, settings, scored, capacity):
        """Unless it ran before, start compiling the block that `rows` rows with these settings (row_settings) will
        run, in a thread: returns the thread, to join before the block's first call, or None.

        Why: a one-off sample.py waits for the prime pass (about 0.1 s of TensorFlow's C++ on its first call) and
        for the block's tracing (Python) and compilation (C++); both calls let go of the GIL, so that in a thread
        of its own the block is traced and compiled while the prime is fed (docs/performance.md, One-off sampling).
        The prime pass is traced first, here: two traces at once would only take turns for the GIL."""
        if (scored, capacity, has_penalty(settings), rows) in self._compiled:
            return None
        self._prime_pass.get_concrete_function()
        vocab, width = self.model.vocab_size, self.model.num_states * self.model.rnn_size
        zeros = (np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros((rows, vocab), np.float32),
                 np.zeros((rows, width), np.float32), np.zeros((rows, vocab), np.int32))

        def compile_block():
            try:
                self.batch_block(0, *zeros, settings, scored, capacity)  # no steps: compiles it, makes nothing
            except Exception:  # noqa: BLE001 - the block's own first call meets the same error and reports it
                pass

        thread = threading.Thread(target=compile_block, name="compile-block", daemon=True)
        thread.start()
        return thread

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None], tf.int32, name="prime"),
        tf.TensorSpec([], tf.int32, name="n"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int32, name="mode"),
        tf.TensorSpec([], tf.int64, name="seed"),
        tf.TensorSpec([], tf.int32, name="top_k"),
        tf.TensorSpec([], tf.float32, name="top_p"),
        tf.TensorSpec([], tf.float32, name="frequency_penalty"),
        tf.TensorSpec([], tf.float32, name="presence_penalty"),
    ])
    def generate(self, prime, n, temperature, mode, seed, top_k, top_p, frequency_penalty, presence_penalty):
        """Feed the prime ids (at least one), then generate n ids; returns int32 [n], or the ids of the blocks
        made so far (fewer than n) once stop() was called. All in one graph (export.py saves it).

        mode: 0 argmax, 1 sample every step, 2 sample only right after a space. temperature divides the
        logits; top_k > 0 samples among the k likeliest tokens only, top_p < 1 among the likeliest whose
        probabilities reach top_p; seed makes the draw repeatable; frequency_penalty and presence_penalty lower the
        logits of the tokens generated so far (see penalize).
        """
        previous, logits, states = self._feed_prime(prime)
        settings = {name: value[tf.newaxis] for name, value in
                    dict(temperature=temperature, mode=mode, seed=seed, top_k=top_k, top_p=top_p,
                         frequency_penalty=frequency_penalty, presence_penalty=presence_penalty).items()}
        num_blocks = (n + GENERATE_BLOCK - 1) // GENERATE_BLOCK
        blocks = tf.TensorArray(tf.int32, size=num_blocks, element_shape=[GENERATE_BLOCK])

        def body(b, previous, logits, states, counts, blocks):
            tokens, previous, logits, states, counts = self.graph_block(
                tf.constant(GENERATE_BLOCK), (b * GENERATE_BLOCK)[tf.newaxis], previous, logits, states, counts,
                settings)
            return b + 1, previous, logits, states, counts, blocks.write(b, tokens[0])

        def more(b, *_):
            return tf.logical_and(b < num_blocks, tf.logical_not(self.stopped.read_value()))

        counts = tf.zeros([1, self.model.vocab_size], tf.int32)
        made, _, _, _, _, blocks = tf.while_loop(
            more, body, (tf.constant(0), previous[tf.newaxis], logits[tf.newaxis], states, counts, blocks))
        # Blocks a stop left unmade concatenate as zeros (the element shape is fixed); the slice drops them.
        return blocks.concat()[:tf.minimum(n, made * GENERATE_BLOCK)]


class Sample(NamedTuple):
    """One of Sampler.samples: the seed it was drawn with, its text, and its tokens' TokenLogprob (empty unless
    logprobs were asked)."""
    seed: int
    text: str
    logprobs: list


class Sampler:
    """A restored model and its vocabulary, ready to generate text; safe to share between threads."""

    def __init__(self, loaded, jit_compile=True):
        """loaded: a savedir.Loaded; jit_compile=False for a generator without XLA (see Generator)."""
        self.train_config, self.model_config = loaded.train_config, loaded.model_config
        self.vocab, self.unk_token = loaded.vocab, loaded.unk_token
        self.word_level = bool(self.train_config.word_level)
        self.index = {token: i for i, token in enumerate(self.vocab)}
        self.generator = Generator(loaded.model, space_id=self.index.get(" ", -1), jit_compile=jit_compile)
        self.start_id = self.index.get(EMPTY_PRIME_START, 0)
        self.keep_crlf = bool(self.train_config.keep_crlf)
        self._beam = None  # a beam.BeamSearch, made at the first beam_search

    @classmethod
    def load(cls, save_dir, word_level_flag=False):
        """Restore save_dir (see savedir.load) and build its sampler.

        word_level_flag is the old --word_level flag: the level comes from the saved config, the flag only warns.
        """
        sampler = cls(savedir.load(save_dir))
        if word_level_flag and not sampler.word_level:
            warn("--word_level ignored: this model was trained at character level")
        return sampler

    def encode(self, prime):
        """Prime text -> token ids; unknown tokens map to the unknown-word token, or are refused by name."""
        return self._encode_normalized(normalize_newlines(prime, self.keep_crlf))

    def _encode_normalized(self, prime):
        return encode_tokens(tokenize(prime, self.word_level), self.index, self.unk_token, self.word_level,
                             what="the prime")

    def run(self, settings, stops=()):
        """The prime followed by settings.n generated tokens, as text (settings: a SampleSettings); with `stops`,
        the text ends right before the first of them that the generated text contains (see stream).

        Bad settings raise ValueError; a stop of the generator (see Generator.stop) before the n tokens were
        made raises GenerationStopped.
        """
        return "".join(self.stream(settings, stops))

    def stream(self, settings, stops=()):
        """run(), piece by piece as it is generated: the prime first, then the text of each block of tokens.

        stops: strings that end the sample at their first occurrence in the generated text (the prime is not
        searched); the text ends right before it, and no more blocks are generated. The last len(longest) - 1
        characters are held back until it is clear that no stop string begins in them.
        """
        for piece, _ in self.pieces(settings, stops):
            yield piece

    def pieces(self, settings, stops=()):
        """stream(), each piece with the TokenLogprob of the tokens that begin in it: (text, [TokenLogprob]),
        the list empty unless settings.logprobs > 0 (see SampleText.take_details). Returns (as a generator
        returns: `text = yield from sampler.pieces(...)`) the SampleText, whose `stopped` says whether a stop
        string ended it."""
        prime, ids, drawn = self.prepare(settings, stops)
        yield prime, []
        text = SampleText(self, prime, stops, settings.logprobs)
        for block, scores in self.generator.blocks(ids, settings.n, drawn):
            yield text.add(block, scores), text.take_details()
            if text.stopped:
                return text
        yield text.rest(), text.take_details()
        if text.made < settings.n:
            raise GenerationStopped(f"the generation was stopped after {text.made} of {settings.n} tokens")
        return text

    def run_many(self, settings, count, stops=()):
        """`count` samples of one prime, generated together as the rows of one batch: [(seed, text)], sample i
        drawn with settings.seed + i (a random seed when None), each text as run() makes it."""
        return [(sample.seed, sample.text) for sample in self.samples(settings, count, stops)]

    def samples(self, settings, count, stops=()):
        """run_many() as [Sample]: each sample's seed, text and (with settings.logprobs) [TokenLogprob]."""
        prime, ids, drawn = self.prepare(settings, stops)
        seed = drawn.seed
        texts = [SampleText(self, prime, stops, settings.logprobs) for _ in range(count)]
        pieces = [[prime] for _ in range(count)]
        details = [[] for _ in range(count)]
        for block, scores in self.generator.blocks(ids, settings.n, drawn, rows=count):
            if count == 1:  # blocks() gives one row's ids (and scores) without the rows' axis
                block = block[np.newaxis]
                scores = None if scores is None else BlockScores(*(score[np.newaxis] for score in scores))
            for i, (text, row, kept) in enumerate(zip(texts, block, pieces)):
                if not text.stopped:
                    kept.append(text.add(row, None if scores is None else scores.row(i, len(row))))
                    details[i] += text.take_details()
            if all(text.stopped for text in texts):
                break
        if any(text.made < settings.n and not text.stopped for text in texts):
            raise GenerationStopped(f"the generation was stopped after {texts[0].made} of {settings.n} tokens")
        return [Sample((seed + i) % (MAX_SEED + 1), "".join(kept) + text.rest(), found + text.take_details())
                for i, (text, kept, found) in enumerate(zip(texts, pieces, details))]

    def beam_search(self, prime, n, width):
        """(the prime followed by the likeliest continuation of n tokens that a beam search of `width` finds, its
        log-probability): see beam.BeamSearch, never less likely than argmax's."""
        check_settings(SampleSettings(prime, n))
        check_beam_width(width)
        prime = normalize_newlines(prime, self.keep_crlf)
        ids = self._encode_normalized(prime) or [self.start_id]
        if self._beam is None:
            import beam
            self._beam = beam.BeamSearch(self.generator.model)
        found, log_probability = self._beam.search(ids, n, width)
        return self.join(prime, [self.vocab[i] for i in found]), log_probability

    def prepare(self, settings, stops):
        """Check the settings: (the prime with its line breaks normalized, its ids, the settings drawn with: the
        mode that the level samples with, and the seed, picked when none is given)."""
        check_settings(settings)
        check_stops(stops)
        prime = normalize_newlines(settings.prime, self.keep_crlf)
        ids = self._encode_normalized(prime) or [self.start_id]
        mode = settings.mode
        if self.word_level and mode == MODE_SAMPLE_ON_SPACES:
            mode = MODE_SAMPLE  # every word follows a space, so "sample on spaces" samples at every step
        seed = pick_seed() if settings.seed is None else settings.seed
        return prime, ids, dataclasses.replace(settings, mode=mode, seed=seed)

    def sample(self, *args, **kwargs):
        """run(SampleSettings(prime, n, mode, temperature, seed, top_k, top_p)): the settings as arguments."""
        return self.run(SampleSettings(*args, **kwargs))

    def join(self, prime, tokens):
        """The prime followed by generated tokens, as the original printed them."""
        text = join_tokens(tokens, self.word_level)
        if self.word_level and prime and text and not prime[-1].isspace() and text[0] != NEWLINE:
            return prime + " " + text  # words are joined by single spaces, line breaks stand alone
        return prime + text
