"""The frequency and presence penalties (OpenAI's formula, per row, over the generated tokens) and the reported
log-probabilities (the model's own, checked step by step through model.step), from the library and sample.py."""
import json
import math
import types

import numpy as np
import pytest
import tensorflow as tf

import sample
import sampler as sampler_module
from conftest import error_line
from sample_text import SampleText
from sampler import GENERATE_BLOCK, BlockScores, Sampler
from settings import MAX_LOGPROBS, MODE_ARGMAX, MODE_SAMPLE, SampleSettings

LOGPROB_TOLERANCE = 1e-5
PROBABILITY_SLACK = 1e-6  # a sum of float32 probabilities may round a hair above 1


@pytest.fixture(scope="module")
def sampler(trained_save_dir):
    return Sampler.load(trained_save_dir)


def row_settings(rows, mode, **values):
    """choose_next's settings for `rows` rows: every row setting at sample.py's default but those given."""
    defaults = SampleSettings(mode=mode, seed=1)
    return {setting.name: tf.constant(np.broadcast_to(values.get(setting.name, getattr(defaults, setting.name)),
                                                      [rows]).astype(setting.dtype))
            for setting in sampler_module.ROW_SETTINGS}


def test_penalties_follow_openais_formula_per_row_and_argmax_reads_them():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 9)).astype(np.float32) * 2
    counts = rng.integers(0, 4, size=(4, 9)).astype(np.int32)
    frequency = np.array([0.0, 0.7, -1.2, 0.3], np.float32)
    presence = np.array([0.0, 0.0, 1.5, -2.0], np.float32)
    # OpenAI: logit_j - count_j * frequency_penalty - [count_j > 0] * presence_penalty, each row its own.
    expected = (logits.astype(np.float64) - counts * frequency[:, None].astype(np.float64)
                - (counts > 0) * presence[:, None].astype(np.float64))
    got = sampler_module.penalize(tf.constant(logits), tf.constant(counts), tf.constant(frequency),
                                  tf.constant(presence)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.array_equal(got[0], logits[0])  # a row without penalties keeps its logits exactly
    settings = row_settings(4, MODE_ARGMAX, frequency_penalty=frequency, presence_penalty=presence)
    chosen = sampler_module.choose_next(tf.constant(logits), tf.zeros([4], tf.int32), tf.fill([4], 0.5),
                                        settings, tf.constant(-1), tf.constant(counts)).numpy()
    assert chosen.tolist() == expected.argmax(axis=1).tolist()


def most_repeated_share(sampler, frequency_penalty, token=None):
    """(the most repeated generated token, or `token`; its share of 2,000 sampled tokens)."""
    text = sampler.run(SampleSettings("the ", 2000, MODE_SAMPLE, 1.0, 11, frequency_penalty=frequency_penalty))
    generated = text[len("the "):]
    token = token or max(set(generated), key=generated.count)
    return token, generated.count(token) / len(generated)


def test_a_positive_frequency_penalty_lowers_the_most_repeated_tokens_share_and_a_negative_one_raises_it(sampler):
    token, share = most_repeated_share(sampler, 0.0)
    _, penalized = most_repeated_share(sampler, 0.5, token)
    _, encouraged = most_repeated_share(sampler, -0.5, token)
    assert penalized < share < encouraged, (token, penalized, share, encouraged)


def test_penalties_count_the_generated_tokens_not_the_prime(sampler):
    # At the first token nothing was generated yet: a penalty cannot change it, whatever the prime repeats.
    prime = "the the the the "
    plain = sampler.run(SampleSettings(prime, 1, MODE_ARGMAX))
    assert sampler.run(SampleSettings(prime, 1, MODE_ARGMAX, frequency_penalty=2.0, presence_penalty=2.0)) == plain
    longer = SampleSettings(prime, 60, MODE_ARGMAX)
    assert sampler.run(SampleSettings(prime, 60, MODE_ARGMAX, presence_penalty=2.0)) != sampler.run(longer)


def replayed_log_probabilities(sampler, prime, text):
    """The model's log-softmax [generated tokens, vocab] before each generated token of `text`, one model.step at
    a time from the zero state (float64), and the generated ids."""
    model = sampler.generator.model
    ids = sampler.encode(text)
    start = len(sampler.encode(prime))
    states, rows = model.zero_state(1), []
    for position, token in enumerate(ids[:-1]):
        logits, states = model.step(tf.constant([token]), states)
        if position >= start - 1:
            logits = logits.numpy()[0].astype(np.float64)
            rows.append(logits - logits.max() - np.log(np.exp(logits - logits.max()).sum()))
    return np.array(rows), np.array(ids[start:])


def test_reported_logprobs_are_the_models_own_step_by_step_and_the_alternatives_the_likeliest_in_order(sampler):
    # Past one block, with the penalties, temperature and top-k that the reported logprobs come before.
    settings = SampleSettings("the ", GENERATE_BLOCK + 40, MODE_SAMPLE, 1.3, 4, top_k=5, frequency_penalty=0.4,
                              presence_penalty=0.2, logprobs=MAX_LOGPROBS)
    [found] = sampler.samples(settings, 1)
    assert found.text == sampler.run(settings)  # asking for logprobs changes no text
    expected, ids = replayed_log_probabilities(sampler, "the ", found.text)
    assert [detail.token for detail in found.logprobs] == [sampler.vocab[i] for i in ids]
    for position, detail in enumerate(found.logprobs):
        assert detail.text_offset == len("the ") + position
        assert detail.logprob == pytest.approx(expected[position, ids[position]], abs=LOGPROB_TOLERANCE)
        likeliest = np.argsort(-expected[position], kind="stable")[:MAX_LOGPROBS]
        top_values = [logprob for _, logprob in detail.top]
        assert top_values == sorted(top_values, reverse=True)
        np.testing.assert_allclose(top_values, expected[position, likeliest], atol=LOGPROB_TOLERANCE)
        for token, logprob in detail.top:
            assert logprob == pytest.approx(expected[position, sampler.vocab.index(token)], abs=LOGPROB_TOLERANCE)
        assert math.exp(detail.logprob) <= 1 + PROBABILITY_SLACK
        assert sum(math.exp(logprob) for _, logprob in detail.top) <= 1 + PROBABILITY_SLACK


def test_a_stop_string_drops_the_logprobs_of_the_tokens_it_cuts_and_pieces_carry_their_own(sampler):
    settings = SampleSettings("the ", 3 * GENERATE_BLOCK, MODE_SAMPLE, 1.0, 9, logprobs=2)
    full = sampler.run(settings)
    stop = full[len("the ") + GENERATE_BLOCK + 5:][:2]
    pieces = list(sampler.pieces(settings, [stop]))
    text = "".join(piece for piece, _ in pieces)
    details = [detail for _, found in pieces for detail in found]
    assert text == sampler.run(settings, [stop]) and len(details) == len(text) - len("the ")
    assert pieces[0] == ("the ", [])  # the prime is no generated token
    starts = np.cumsum([len(piece) for piece, _ in pieces])  # where the piece after each begins
    for piece_start, (piece, found) in zip(starts, pieces[1:]):
        assert [detail.text_offset for detail in found] == list(range(piece_start, piece_start + len(piece)))
        assert all(text[detail.text_offset] == detail.token and len(detail.top) == 2 for detail in found)


def test_word_level_offsets_point_at_each_word_in_the_joined_text():
    vocab = ["\n", "the", "cat", "sat."]
    words = types.SimpleNamespace(vocab=vocab, word_level=True)
    words.join = lambda prime, tokens: Sampler.join(words, prime, tokens)
    text = SampleText(words, "a", logprobs=1)
    ids = [1, 2, 0, 0, 3, 1]
    scores = BlockScores(np.linspace(-1, -0.1, len(ids)), np.zeros((len(ids), 1), np.int32),
                         np.full((len(ids), 1), -0.5))
    joined = "a" + text.add(ids[:4], BlockScores(*(score[:4] for score in scores)))  # two blocks
    joined += text.add(ids[4:], BlockScores(*(score[4:] for score in scores))) + text.rest()
    details = text.take_details()
    assert joined == "a the cat\n\nsat. the"
    assert [joined[d.text_offset:d.text_offset + len(d.token)] for d in details] == [vocab[i] for i in ids]
    assert details[0].top == [("\n", -0.5)]


def test_sample_py_json_prints_one_object_a_sample_with_its_logprobs(trained_save_dir, sampler, capsys):
    capsys.readouterr()
    assert sample.main(["--save_dir", trained_save_dir, "--prime", "the ", "-n", "30", "--seed", "3",
                        "--frequency_penalty", "0.5", "--logprobs", "3", "--json", "--num_samples", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    settings = SampleSettings("the ", 30, seed=3, frequency_penalty=0.5, logprobs=3)
    for line, expected in zip(lines, sampler.samples(settings, 2), strict=True):
        answer = json.loads(line)
        assert (answer["text"], answer["seed"], answer["frequency_penalty"]) == (expected.text, expected.seed, 0.5)
        logprobs = answer["logprobs"]
        assert logprobs["tokens"] == [detail.token for detail in expected.logprobs]
        assert logprobs["token_logprobs"] == [detail.logprob for detail in expected.logprobs]
        assert logprobs["top_logprobs"] == [dict(detail.top) for detail in expected.logprobs]
        assert logprobs["text_offset"] == list(range(4, 34))
    assert sample.main(["--save_dir", trained_save_dir, "--logprobs", "2"]) == 2
    assert "add --json" in error_line(capsys)
    assert sample.main(["--save_dir", trained_save_dir, "--logprobs", "6", "--json"]) == 2
    assert "logprobs must be an integer from 0 to 5" in error_line(capsys)
    with pytest.raises(SystemExit):
        sample.main(["--save_dir", trained_save_dir, "--presence_penalty", "2.5"])
    assert "not a number from -2 to 2" in capsys.readouterr().err
