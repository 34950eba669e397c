"""Beam search over a CharRNN: the likeliest continuation of a prime that the search can find, for "give me the
likeliest text after this" rather than a sample.

BeamSearch(model).search(prime_ids, n, width) feeds the prime once, then keeps the `width` likeliest n-token
hypotheses step by step (each step scores every hypothesis x every token and keeps the top `width`), and returns
the best one's ids and its log-probability (natural log, temperature 1). All hypotheses are n tokens long, so
their summed log-probabilities compare as they are (no length normalisation). Width 1 is greedy decoding: the
same ids as sampler.py's mode 0 (argmax at every step).

Guarantee: the result is never less likely than greedy decoding's. Plain beam search does not promise this (the
greedy path can fall out of the beam early and be beaten by hypotheses that fade later), so the greedy path runs
alongside the beam as one more row of the batch, and the search returns it whenever the beam found nothing
strictly likelier. The search is deterministic: ties go to the lower hypothesis and token index.

The whole n-step loop is one compiled graph (tf.function, explicit tf.while_loop) with the beam as the batch of
model.step; back-pointers recorded per step recover the best sequence at the end, so a step costs width + 1 rows
whatever n is.
"""
import numpy as np
import tensorflow as tf

INT32_MAX = 2 ** 31 - 1  # the search indexes width x vocab candidates and counts steps in int32


class BeamSearch(tf.Module):
    """Compiled beam search over one CharRNN; holds no Python state, so one instance serves many threads."""

    def __init__(self, model):
        """model: a CharRNN (model.py) with its weights built."""
        super().__init__(name="beam_search")
        self.model = model

    def search(self, prime_ids, n, width):
        """prime_ids (a non-empty list of token ids), n >= 0 tokens to add, width >= 1 hypotheses kept ->
        (ids: int32 numpy array [n], log_probability: float, the sum of the n tokens' log-probabilities)."""
        vocab_size = self.model.vocab_size
        if len(prime_ids) == 0:
            raise ValueError("the prime must hold at least one token id (give a start token for an empty prime)")
        bad = [i for i in prime_ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"prime ids outside the vocabulary of {vocab_size} tokens: {bad}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= INT32_MAX:
            raise ValueError(f"n must be an integer from 0 to {INT32_MAX}, got {n!r}")
        max_width = INT32_MAX // vocab_size
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= max_width:
            raise ValueError(f"width must be an integer from 1 to {max_width}, got {width!r}")
        ids, log_probability = self._search(tf.constant(prime_ids, tf.int32), tf.constant(n, tf.int32),
                                            tf.constant(width, tf.int32))
        return ids.numpy(), float(log_probability.numpy())

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None], tf.int32, name="prime"),
        tf.TensorSpec([], tf.int32, name="n"),
        tf.TensorSpec([], tf.int32, name="width"),
    ])
    def _search(self, prime, n, width):
        """The compiled search: (ids int32 [n], log-probability float32 []). Rows 0..width-1 of every batch are
        the beam, row `width` the greedy path."""
        model = self.model
        logits, states = model(prime[tf.newaxis], model.zero_state(1))
        rows = width + 1
        logits = tf.tile(logits[:, -1], [rows, 1])  # (rows, vocab): every row starts after the prime
        states = tuple(tf.tile(state, [rows, 1]) for state in states)  # (rows, rnn_size) each
        # The beam starts from one hypothesis: the other rows' -inf keeps them out until there are enough distinct
        # hypotheses to fill the beam (when vocab ** step < width, the rest stay -inf, never chosen at the end).
        scores = tf.concat([[0.0], tf.fill([width - 1], -np.inf), [0.0]], axis=0)  # (rows,)
        table = model.step_table()
        tokens = tf.TensorArray(tf.int32, size=n, element_shape=[None])  # per step: (rows,) token ids
        parents = tf.TensorArray(tf.int32, size=n, element_shape=[None])  # per step: (rows,) the row each extends

        def body(t, logits, states, scores, tokens, parents):
            step_tokens, step_parents, scores = extend(logits, scores, width)
            # Each row continues from its parent's state; a hypothesis may have several children or none.
            states = tuple(tf.gather(state, step_parents) for state in states)
            logits, states = model.step(step_tokens, states, table)
            return t + 1, logits, states, scores, tokens.write(t, step_tokens), parents.write(t, step_parents)

        _, _, _, scores, tokens, parents = tf.while_loop(
            lambda t, *_: t < n, body, (tf.constant(0), logits, states, scores, tokens, parents))
        # The beam's best only where it is strictly likelier than greedy's path; at width 1 the beam's one
        # hypothesis is greedy's up to rounding, and greedy decoding's ids are the promise.
        best_in_beam = tf.argmax(scores[:width], output_type=tf.int32)
        beam_wins = tf.logical_and(width > 1, scores[best_in_beam] > scores[width])
        best = tf.where(beam_wins, best_in_beam, width)
        return backtrack(tokens, parents, best, n), scores[best]


def extend(logits, scores, width):
    """One step: logits (rows, vocab) after each row's hypothesis and its score (rows,) -> the new rows' tokens,
    the rows they extend and their scores, each (rows,). The beam keeps the top `width` of its width x vocab
    candidates; the last row (greedy) takes its argmax."""
    vocab_size = tf.shape(logits)[1]
    log_probs = tf.nn.log_softmax(logits)  # (rows, vocab)
    candidates = tf.reshape(scores[:width, tf.newaxis] + log_probs[:width], [-1])  # (width * vocab,)
    beam_scores, flat = tf.math.top_k(candidates, k=width)  # ties: the lower index first
    greedy_token = tf.argmax(logits[width], output_type=tf.int32)  # sampler.py's mode 0 argmaxes the logits
    greedy_score = scores[width] + log_probs[width, greedy_token]
    step_tokens = tf.concat([flat % vocab_size, [greedy_token]], axis=0)
    step_parents = tf.concat([flat // vocab_size, [width]], axis=0)
    return step_tokens, step_parents, tf.concat([beam_scores, [greedy_score]], axis=0)


def backtrack(tokens, parents, row, n):
    """The ids [n] of the hypothesis in `row` after the last step, from the TensorArrays of each step's tokens and
    parents (rows,); read step by step, since an empty TensorArray of unknown row count cannot be stacked."""
    ids = tf.TensorArray(tf.int32, size=n, element_shape=[])

    def body(t, row, ids):
        # Step t's token in this row, then the row its hypothesis extended at step t.
        return t - 1, parents.read(t)[row], ids.write(t, tokens.read(t)[row])

    _, _, ids = tf.while_loop(lambda t, *_: t >= 0, body, (n - 1, row, ids))
    return ids.stack()
