"""Beam search: width 1 is greedy decoding, wider beams are never less likely than greedy and score what they
return, a wide enough beam finds the exact maximum, and the same call gives the same ids."""
import itertools

import numpy as np
import pytest
import tensorflow as tf

import sampler
import savedir
from beam import BeamSearch
from model import CharRNN
from settings import MODE_ARGMAX, ModelConfig

TRAINED_PRIMES = ["the ", "t", "dog sat on", "\n", "mat.\nthe c"]
RANDOM_PRIMES = [[0], [1, 2, 3], [4, 4], [2, 0, 1, 3, 4, 2]]
WIDTHS = [2, 4, 8]


def random_model(vocab_size, cell="lstm"):
    """A tiny untrained CharRNN with weights scaled up, so that argmax paths vary from token to token."""
    tf.keras.utils.set_random_seed(1)
    net = CharRNN(ModelConfig(vocab_size, cell, 16, 2))
    net.build_weights()
    for weight in net.trainable_variables:
        weight.assign(weight * 3.0)
    return net


@pytest.fixture(scope="module")
def small():
    """(model, its BeamSearch) over 5 tokens."""
    net = random_model(5)
    return net, BeamSearch(net)


@pytest.fixture(scope="module")
def trained(trained_save_dir):
    """(model, its BeamSearch, {token: id}) of the session's trained save dir."""
    loaded = savedir.load(trained_save_dir)
    return loaded.model, BeamSearch(loaded.model), {token: i for i, token in enumerate(loaded.vocab)}


def greedy(net, prime, n):
    """Plain greedy decoding, one model.step at a time: (ids, their summed log-probability)."""
    logits, states = net(tf.constant([prime]), net.zero_state(1))
    logits, ids, total = logits[:, -1], [], 0.0
    for _ in range(n):
        token = int(tf.argmax(logits[0]))
        total += float(tf.nn.log_softmax(logits[0])[token])
        ids.append(token)
        logits, states = net.step(tf.constant([token]), states)
    return ids, total


def log_probability(net, prime, ids):
    """The summed log-probability of ids after prime, from one pass over prime + ids."""
    logits, _ = net(tf.constant([list(prime) + list(ids)]), net.zero_state(1))
    log_probs = tf.nn.log_softmax(logits[0]).numpy()  # (time, vocab)
    return float(sum(log_probs[len(prime) - 1 + k, token] for k, token in enumerate(ids)))


def plain_beam_search(net, prime, n, width):
    """Textbook beam search in Python, without the greedy path kept: (ids, summed log-probability)."""
    logits, states = net(tf.constant([prime]), net.zero_state(1))
    logits, hypotheses = logits[:, -1], [([], 0.0)]  # the beam starts from one hypothesis
    for _ in range(n):
        log_probs = tf.nn.log_softmax(logits).numpy()  # (hypotheses, vocab)
        candidates = [(score + log_probs[row, token], row, token)
                      for row, (_, score) in enumerate(hypotheses) for token in range(net.vocab_size)]
        kept = sorted(candidates, key=lambda c: -c[0])[:width]  # a stable sort: ties keep the lower index
        hypotheses = [(hypotheses[row][0] + [token], score) for score, row, token in kept]
        parents, tokens = [row for _, row, _ in kept], [token for _, _, token in kept]
        logits, states = net.step(tf.constant(tokens), tuple(tf.gather(state, parents) for state in states))
    return max(hypotheses, key=lambda h: h[1])


def test_width_one_is_greedy_decoding(small):
    net, search = small
    for prime in RANDOM_PRIMES:
        ids, total = search.search(prime, 15, 1)
        expected_ids, expected_total = greedy(net, prime, 15)
        assert ids.tolist() == expected_ids
        assert total == pytest.approx(expected_total, abs=1e-4)


def test_width_one_writes_what_sampling_mode_0_writes(trained, trained_save_dir):
    _, search, index = trained
    vocab = list(index)
    text_sampler = sampler.Sampler.load(trained_save_dir)
    for prime in TRAINED_PRIMES[:3]:
        ids, _ = search.search([index[c] for c in prime], 40, 1)
        assert prime + "".join(vocab[i] for i in ids) == text_sampler.sample(prime, 40, mode=MODE_ARGMAX)


@pytest.mark.parametrize("which", ["trained", "random"])
def test_wider_beams_are_never_less_likely_than_greedy_and_score_what_they_return(which, request):
    if which == "trained":
        net, search, index = request.getfixturevalue("trained")
        primes = [[index[c] for c in prime] for prime in TRAINED_PRIMES]
    else:
        (net, search), primes = request.getfixturevalue("small"), RANDOM_PRIMES
    for prime in primes:
        _, greedy_total = search.search(prime, 20, 1)
        for width in WIDTHS:
            ids, total = search.search(prime, 20, width)
            assert len(ids) == 20
            assert total >= greedy_total - 1e-4, (prime, width)
            assert total == pytest.approx(log_probability(net, prime, ids), abs=1e-3)


def test_the_result_is_the_textbook_beam_or_greedy_whichever_is_likelier(small):
    """Against a plain beam search written out in Python; after [1, 3, 3] the width-2 textbook beam prunes the
    greedy path and ends less likely than greedy (the case the kept greedy path is for)."""
    net, search = small
    ids, total = search.search([1, 3, 3], 10, 2)
    greedy_ids, greedy_total = greedy(net, [1, 3, 3], 10)
    assert plain_beam_search(net, [1, 3, 3], 10, 2)[1] < greedy_total - 0.1
    assert ids.tolist() == greedy_ids and total == pytest.approx(greedy_total, abs=1e-4)
    for prime in RANDOM_PRIMES:
        greedy_ids, greedy_total = greedy(net, prime, 10)
        for width in [2, 3]:
            plain_ids, plain_total = plain_beam_search(net, prime, 10, width)
            expected = plain_ids if plain_total > greedy_total + 1e-4 else greedy_ids
            assert search.search(prime, 10, width)[0].tolist() == expected, (prime, width)


def test_a_wider_beam_can_beat_greedy(small):
    """Not a promise for every prime, but the point of the search: here some prime has a likelier continuation."""
    net, search = small
    gains = [search.search(prime, 10, 8)[1] - search.search(prime, 10, 1)[1] for prime in RANDOM_PRIMES]
    assert max(gains) > 1e-3, gains


@pytest.mark.parametrize("cell, vocab_size", [("lstm", 4), ("gru", 6), ("rnn", 5)])
def test_a_beam_of_every_prefix_finds_the_exact_maximum(cell, vocab_size):
    """A beam holding all vocab ** (n - 1) prefixes before the last step must find the likeliest of all
    vocab ** n continuations: checked against every one of them, scored in one batch."""
    net, n, prime = random_model(vocab_size, cell), 3, [1, 0]
    continuations = np.array(list(itertools.product(range(vocab_size), repeat=n)))  # (vocab ** n, n)
    inputs = np.concatenate([np.tile(prime, (len(continuations), 1)), continuations], axis=1)
    logits, _ = net(tf.constant(inputs, tf.int32), net.zero_state(len(continuations)))
    log_probs = tf.nn.log_softmax(logits[:, len(prime) - 1:-1]).numpy()  # (vocab ** n, n, vocab)
    totals = np.take_along_axis(log_probs, continuations[:, :, np.newaxis], axis=2).sum(axis=(1, 2))
    search = BeamSearch(net)
    for width in [vocab_size ** (n - 1), vocab_size ** n + 3]:  # just enough; more than there are continuations
        ids, total = search.search(prime, n, width)
        assert ids.tolist() == continuations[np.argmax(totals)].tolist()
        assert total == pytest.approx(totals.max(), abs=1e-4)


def test_the_same_call_gives_the_same_ids(small):
    _, search = small
    first = search.search([1, 2, 3], 25, 4)
    second = search.search([1, 2, 3], 25, 4)
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]


def test_no_tokens_asked_gives_none(small):
    ids, total = small[1].search([2], 0, 3)
    assert ids.shape == (0,) and total == 0.0


@pytest.mark.parametrize("prime, n, width, message", [
    ([], 5, 2, "at least one token id"),
    ([1, 7], 5, 2, r"outside the vocabulary of 5 tokens: \[7\]"),
    ([1], -1, 2, "n must be an integer"),
    ([1], 5, 0, "width must be an integer"),
    ([1], 5, 2.5, "width must be an integer"),
])
def test_bad_arguments_are_refused_by_name(small, prime, n, width, message):
    with pytest.raises(ValueError, match=message):
        small[1].search(prime, n, width)
