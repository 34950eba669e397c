"""See inside a trained model: how sure it was of each token of a text, and which cells of a layer track simple
features of the text (inside quotes, position in the line, ...).

One batched pass through the network (CharRNN.call_tracking: the cells' arithmetic of the unrolled training pass
and of sampling's `step`) gives, at every position, the probability of the next token, the likeliest
alternatives, and the chosen layer's state (LSTM: the cell state c; GRU, RNN: the hidden state h). Long texts go
through in chunks of ANALYSIS_CHUNK positions with the state carried, so that a megabyte fits in memory: the
activations are kept only for the first REPORT_MAX_TOKENS positions (the report's), while the correlation of every
cell with every feature is accumulated over the whole text: each compiled chunk adds up its sums of products (in
float32, a chunk's few thousand positions), and those are added up in float64.

Like evaluation.py, the text is cut into parallel streams for speed (each from a zero state), but never into
streams shorter than REPORT_MAX_TOKENS: a text up to twice that long is read as one sequence, and the report's
part of a longer one always lies in the first stream, read with its whole context. Used by analyze.py and by the
server's POST /analyze; analysis_report.py writes the HTML.
"""
import dataclasses
import itertools
import math
import string
import threading

import numpy as np
import tensorflow as tf
from tensorflow import keras

from evaluation import EVAL_STREAMS, stream_layout
from settings import ANALYSIS_CELLS, ANALYSIS_TOP, REPORT_MAX_TOKENS
from unrolled import UNROLL_MAX_STEPS
from utils import NEWLINE, encode_tokens, join_tokens, tokenize

ANALYSIS_CHUNK = UNROLL_MAX_STEPS  # positions per compiled call (the unrolled pass takes a static length)
SURPRISING_LINES = 5  # lines listed as the most surprising
MIN_LINE_TOKENS = 5  # a line needs this many predicted tokens to be listed (one odd character is not a line)
ACTIVATION_DECIMALS = 3  # activations in the JSON are rounded to this many decimals
PROBABILITY_DIGITS = 4  # significant digits of the probabilities in the JSON
OPENING, CLOSING = "([{", ")]}"
VOWELS = "aeiouAEIOU"
STATE_NAMES = {"lstm": "cell state c", "gru": "hidden state h", "rnn": "hidden state h"}


# ----------------------------------------------------------------------------------------------------------
# The features of a text: one value per token, the token included (a cell reads it before it is compared)


def token_features(tokens):
    """{feature name: array [len(tokens)]} of simple features of a token sequence (characters or words): inside
    double quotes, inside brackets, position in the line (tokens since the line began), start of a word, after a
    line break (the line's first token), inside a word, vowel, uppercase, space, punctuation, indentation (the
    spaces that begin a line). What depends on the token alone is worked out once per distinct token."""
    distinct = {}
    ids = np.array([distinct.setdefault(token, len(distinct)) for token in tokens])
    kinds = {name: np.array([test(token) for token in distinct])[ids] for name, test in TOKEN_TESTS.items()}
    letter, space = kinds["letter"], kinds["space"]
    positions = np.arange(len(tokens))
    starts_line = np.concatenate([[True], kinds["newline"][:-1]])
    line_start = np.maximum.accumulate(np.where(starts_line, positions, 0))
    non_space = np.cumsum(~space)
    non_space_before_line = np.where(line_start > 0, non_space[line_start - 1], 0)
    return {
        "inside quotes": np.cumsum(kinds["quotes"]) % 2,
        "inside brackets": open_brackets(kinds["opening"] - kinds["closing"]) > 0,
        "position in line": positions - line_start,
        "start of word": letter & ~np.concatenate([[False], letter[:-1]]),
        "after line break": starts_line,
        "inside word": letter,
        "vowel": kinds["vowel"],
        "uppercase": kinds["uppercase"],
        "space": space,
        "punctuation": kinds["punctuation"],
        "indentation": space & ~kinds["newline"] & (non_space == non_space_before_line),
    }


# What a token is, by itself (its first character, for words), and what it holds.
TOKEN_TESTS = {
    "letter": lambda token: token[:1].isalpha(),
    "space": lambda token: token[:1].isspace(),
    "newline": lambda token: token == NEWLINE,
    "vowel": lambda token: token[:1] != "" and token[:1] in VOWELS,
    "uppercase": lambda token: token[:1].isupper(),
    "punctuation": lambda token: token[:1] != "" and token[:1] in string.punctuation,
    "quotes": lambda token: token.count('"'),
    "opening": lambda token: sum(token.count(c) for c in OPENING),
    "closing": lambda token: sum(token.count(c) for c in CLOSING),
}


def open_brackets(changes):
    """How many brackets are open after each token, from each token's opened minus closed count; a closing
    bracket with none open is ignored: the running sum kept at 0 or above, which is the sum less its lowest
    point so far (Lindley's formula)."""
    total = np.cumsum(changes)
    return total - np.minimum(np.minimum.accumulate(total), 0)


class Correlations:
    """Pearson's r of every cell with every feature over positions, from sums that the compiled chunks add up
    (sums_of): the features' own sums are taken once, over every position."""

    def __init__(self, units, features):
        """features: one array of values per feature, each over every position."""
        self.count = len(features[0]) if features else 0
        self.sum_f = np.array([np.sum(f, dtype=np.float64) for f in features])
        self.sum_ff = np.array([np.sum(np.square(f, dtype=np.float64)) for f in features])
        self.sum_x, self.sum_xx = np.zeros(units), np.zeros(units)
        self.sum_xf = np.zeros((units, len(features)))

    def add(self, sum_x, sum_xx, sum_xf):
        """A chunk's sums over its positions: of each cell's activation, of its square, and of its product with
        each feature ([units, features])."""
        self.sum_x += sum_x
        self.sum_xx += sum_xx
        self.sum_xf += sum_xf

    def pearson(self):
        """[units, features] correlations; 0 where a cell or a feature does not vary."""
        n = max(self.count, 1)
        mean_x, mean_f = self.sum_x / n, self.sum_f / n
        var_x = np.maximum(self.sum_xx / n - mean_x ** 2, 0)
        var_f = np.maximum(self.sum_ff / n - mean_f ** 2, 0)
        covariance = self.sum_xf / n - np.outer(mean_x, mean_f)
        scale = np.sqrt(np.outer(var_x, var_f))
        return np.divide(covariance, scale, out=np.zeros_like(covariance), where=scale > 1e-12)


def sums_of(activations, weights, features):
    """In the graph: the sums Correlations.add takes, over the positions of weight 1 (activations [streams, time,
    units], weights [streams, time], features [streams, time, features])."""
    weighted = activations * weights[..., tf.newaxis]
    return (tf.reduce_sum(weighted, [0, 1]), tf.reduce_sum(weighted * activations, [0, 1]),
            tf.einsum("stu,stf->uf", weighted, features))


# ----------------------------------------------------------------------------------------------------------
# The pass


@dataclasses.dataclass
class Pass:
    """What one analysis pass measured over `count` predictions (position i predicts token i + 1).

    losses [count] (nats), top_ids and top_probabilities [count, top], activations [min(count, window), units] (the
    chosen layer's state after reading token i), correlations [units, features] over every position, the
    feature names in their columns' order, and the number of streams the text was read in."""
    losses: np.ndarray
    top_ids: np.ndarray
    top_probabilities: np.ndarray
    activations: np.ndarray
    correlations: np.ndarray
    feature_names: list
    streams: int


def analysis_streams(count, window=REPORT_MAX_TOKENS):
    """How many parallel streams a pass over `count` predictions uses: evaluation's, but none shorter than
    `window`, so that the report's positions are read as one sequence from the text's start."""
    return max(1, min(EVAL_STREAMS, count // window))


class Analyzer:
    """Runs analysis passes on one model; its compiled chunks (one per layer and top) are kept for later calls
    and may be shared by threads (the server's)."""

    def __init__(self, model):
        self.model = model
        self._chunks = {}
        self._lock = threading.Lock()

    def chunk_function(self, layer, top):
        """The compiled chunk for a layer (0-based) and top: (inputs, targets, weights, features, states) ->
        (losses, top ids, top probabilities, new states, the layer's state at every position, its sums_of)."""
        with self._lock:
            if (layer, top) not in self._chunks:
                self._chunks[layer, top] = self._make_chunk(layer, top)
            return self._chunks[layer, top]

    def _make_chunk(self, layer, top):
        model = self.model

        @tf.function(reduce_retracing=True)
        def chunk(inputs, targets, weights, features, states):
            logits, new_states, tracked = model.call_tracking(inputs, states, layer)
            losses = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
            top_logits, top_ids = tf.math.top_k(logits, top)
            top_probabilities = tf.exp(top_logits - tf.reduce_logsumexp(logits, axis=-1, keepdims=True))
            return losses, top_ids, top_probabilities, new_states, tracked, sums_of(tracked, weights, features)
        return chunk

    def run(self, ids, layer, top=ANALYSIS_TOP, window=REPORT_MAX_TOKENS, features=None):
        """One pass over token ids (at least 2) with the state carried: a Pass. layer is 0-based; features, a
        dict of per-token arrays (token_features), defaults to none."""
        count = len(ids) - 1
        features = features or {}
        names = list(features)
        streams = analysis_streams(count, window)
        inputs, targets, weights = stream_layout(ids, streams)
        length = inputs.shape[1]  # of each stream; the padding to whole chunks after it weighs 0
        inputs, targets, weights = (pad_to_chunks(array) for array in (inputs, targets, weights))
        table = feature_layout([features[name][:count] for name in names], length, inputs.shape)
        top = min(top, self.model.vocab_size)
        chunk = self.chunk_function(layer, top)
        losses = np.zeros(inputs.shape, np.float32)
        top_ids = np.zeros((*inputs.shape, top), np.int32)
        top_probabilities = np.zeros((*inputs.shape, top), np.float32)
        kept = []
        correlations = Correlations(self.model.rnn_size, [features[name][:count] for name in names])
        states = self.model.zero_state(streams)
        for start in range(0, inputs.shape[1], ANALYSIS_CHUNK):
            columns = slice(start, start + ANALYSIS_CHUNK)
            loss, ids_k, probabilities_k, states, tracked, sums = chunk(
                inputs[:, columns], targets[:, columns], weights[:, columns], table[:, columns], states)
            losses[:, columns], top_ids[:, columns], top_probabilities[:, columns] = loss, ids_k, probabilities_k
            if start < window:  # only the report's positions leave the graph
                kept.append(tracked[0, :window - start].numpy())
            correlations.add(*(sum_.numpy() for sum_ in sums))
        activations = np.concatenate(kept)[:min(count, window)]
        return Pass(in_text_order(losses, length, count), in_text_order(top_ids, length, count),
                    in_text_order(top_probabilities, length, count), activations, correlations.pearson(), names,
                    streams)


def in_text_order(array, length, count):
    """A [streams, padded length, ...] array's first `count` positions in the text's order."""
    return array[:, :length].reshape(array.shape[0] * length, *array.shape[2:])[:count]


def pad_to_chunks(array):
    """A [streams, length, ...] array with zeros after each stream up to a whole number of chunks, so that every
    compiled call has the same length."""
    padding = [(0, 0), (0, -array.shape[1] % ANALYSIS_CHUNK)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, padding)


def feature_layout(columns, length, shape):
    """The features of the read positions (a list of per-position arrays), laid out as the streams of `length`
    positions are, padded to `shape` ([streams, padded length]): [streams, padded length, features]."""
    table = np.zeros((*shape, len(columns)), np.float32)
    flat = np.zeros(shape[0] * length, np.float32)
    for column, values in enumerate(columns):
        flat[:len(values)] = values
        table[:, :length, column] = flat.reshape(shape[0], length)
    return table


# ----------------------------------------------------------------------------------------------------------
# From a text to the report's data


def encode(text, vocab, unk_token, word_level):
    """(tokens, ids) of a text; a token the model does not know is refused by name (ValueError), or becomes the
    unknown-word token at word level when the vocabulary has one."""
    tokens = tokenize(text, word_level)
    index = {token: i for i, token in enumerate(vocab)}
    ids = encode_tokens(tokens, index, unk_token, word_level)
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token{'s' * (len(ids) != 1)}: at least 2 are needed "
                         f"(the first is only read, the others are predicted)")
    return tokens, ids


def check_layer(layer, num_layers):
    """A 1-based layer number (None: the last) -> its 0-based index; ValueError when the model has no such layer."""
    if layer is None:
        return num_layers - 1
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= num_layers:
        raise ValueError(f"layer must be from 1 to {num_layers} (this model's layers), got {layer!r}")
    return layer - 1


def analyze_text(analyzer, text, vocab, unk_token, word_level, top=ANALYSIS_TOP, cells=ANALYSIS_CELLS, layer=None,
                 window=REPORT_MAX_TOKENS):
    """The whole analysis of a text as a JSON-ready dict (see report_data); raises ValueError for a text with
    unknown tokens, fewer than 2 tokens, or a layer the model does not have."""
    result, tokens, index = run_text(analyzer, text, vocab, unk_token, word_level, top, layer, window)
    return report_data(result, tokens, vocab, word_level, cells, index, analyzer.model)


def run_text(analyzer, text, vocab, unk_token, word_level, top=ANALYSIS_TOP, layer=None, window=REPORT_MAX_TOKENS):
    """The pass over a text: (its Pass, its tokens, the layer's 0-based index); ValueError as analyze_text."""
    index = check_layer(layer, analyzer.model.num_layers)
    tokens, ids = encode(text, vocab, unk_token, word_level)
    return analyzer.run(ids, index, top, window, token_features(tokens)), tokens, index


def report_data(result, tokens, vocab, word_level, cells, layer, model, positions_limit=None):
    """The JSON of an analysis: the text's bits per token, and for each token (the first is only read; only the
    first `positions_limit` tokens, if given) its probability, its surprise in bits and the likeliest alternatives;
    the most surprising lines; the `cells` cells of the layer that best track a feature, with their activations
    over the first positions."""
    loss = float(np.sum(result.losses, dtype=np.float64)) / len(result.losses)
    return {
        "level": "word" if word_level else "character",
        "tokens": len(tokens),
        "predicted": len(result.losses),
        "loss_nats": loss,
        "bits_per_token": loss / math.log(2),
        "streams": result.streams,
        "layer": layer + 1,
        "layers": model.num_layers,
        "state": STATE_NAMES[model.cell_type],
        "units": model.rnn_size,
        "positions": list(itertools.islice(positions_json(result, tokens, vocab), positions_limit)),
        "surprising_lines": surprising_lines(result.losses, tokens, word_level),
        "cells": top_cells(result, cells),
    }


def positions_json(result, tokens, vocab):
    """Yields one entry per token, in order: the token, and (but for the first) its probability, its surprise in
    bits and the likeliest alternatives as [token, probability] pairs. A generator, so that a long text's entries
    can be written one by one."""
    yield {"token": tokens[0], "probability": None, "bits": None, "alternatives": []}
    for i, token in enumerate(tokens[1:]):
        loss = float(result.losses[i])
        alternatives = [[vocab[k], round_probability(p)]
                        for k, p in zip(result.top_ids[i].tolist(), result.top_probabilities[i].tolist())]
        yield {"token": token, "probability": round_probability(math.exp(-loss)),
               "bits": round(loss / math.log(2), PROBABILITY_DIGITS), "alternatives": alternatives}


def round_probability(p):
    return float(f"{p:.{PROBABILITY_DIGITS}g}")


def surprising_lines(losses, tokens, word_level):
    """The SURPRISING_LINES lines of highest mean surprise (bits per predicted token; a line's break counts as
    its last token), among lines of at least MIN_LINE_TOKENS predicted tokens: [{"line", "text", "bits_per_token"}]."""
    is_newline = np.array([token == NEWLINE for token in tokens])
    line_of = np.concatenate([[0], np.cumsum(is_newline)[:-1]])  # a line break belongs to the line it ends
    predicted = line_of[1:]
    bits = np.bincount(predicted, weights=losses.astype(np.float64) / math.log(2))
    counts = np.bincount(predicted)
    mean = np.divide(bits, counts, out=np.zeros_like(bits), where=counts >= MIN_LINE_TOKENS)
    worst = [int(line) for line in np.argsort(-mean, kind="stable")[:SURPRISING_LINES] if mean[line] > 0]
    starts = np.searchsorted(line_of, worst)
    ends = np.searchsorted(line_of, worst, side="right")
    return [{"line": line + 1, "text": join_tokens(tokens[start:end], word_level).rstrip("\n"),
             "bits_per_token": round(float(mean[line]), PROBABILITY_DIGITS)}
            for line, start, end in zip(worst, starts, ends)]


def top_cells(result, cells):
    """The `cells` cells whose best feature they track most strongly (|r|): [{"cell", "feature", "r",
    "correlations": {feature: r}, "activations": [its state after each of the first positions]}]."""
    if not result.feature_names:
        return []
    strongest = np.abs(result.correlations).max(axis=1)
    chosen = np.argsort(-strongest, kind="stable")[:cells]
    listed = []
    for cell in chosen.tolist():
        row = result.correlations[cell]
        best = int(np.argmax(np.abs(row)))
        listed.append({"cell": cell, "feature": result.feature_names[best], "r": round(float(row[best]), 4),
                       "correlations": {name: round(float(r), 4) for name, r in zip(result.feature_names, row)},
                       "activations": np.round(result.activations[:, cell].astype(np.float64),
                                               ACTIVATION_DECIMALS).tolist()})
    return listed
