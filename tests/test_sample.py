"""sample.py and the generator: output, repeatability, the sampling distribution, no retracing, errors."""
import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import sample
import sampler as sampler_module
import train
from conftest import TINY_MODEL, make_data_dir, run_script
from prime_states import PrimeStates
from sampler import GENERATE_BLOCK, Sampler
from settings import MAX_N, MAX_SEED, SampleSettings, check_settings

WORD_TEXT = "the cat sat on the mat\nthe dog sat on the log\na cat and a dog\n" * 40


@pytest.fixture(scope="module")
def sampler(trained_save_dir):
    return Sampler.load(trained_save_dir)


@pytest.fixture(scope="module")
def word_save_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    save = str(root / "save")
    code = train.main(["--data_dir", make_data_dir(root / "data", WORD_TEXT), "--save_dir", save, "--word_level",
                       *TINY_MODEL, "--num_epochs", "2", "--print_every", "100", "--seed", "2"])
    assert code == 0
    return save


def sample_cli(save_dir, *args):
    result = run_script("sample.py", "--save_dir", save_dir, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


@pytest.mark.slow
def test_prints_prime_then_n_characters_from_latest_and_best(trained_save_dir):
    for save_dir in (trained_save_dir, os.path.join(trained_save_dir, "best")):
        text = sample_cli(save_dir, "-n", 40, "--prime", "the ", "--seed", 5)
        assert text.startswith("the ") and len(text) == 4 + 40


@pytest.mark.slow
def test_word_model_prints_prime_then_n_words_with_line_breaks(word_save_dir):
    for save_dir in (word_save_dir, os.path.join(word_save_dir, "best")):
        text = sample_cli(save_dir, "-n", 60, "--prime", "the cat", "--seed", 3)
        assert text.startswith("the cat ")
        tokens = text.replace("\n", " \n ").split(" ")
        assert len([t for t in tokens if t]) == 2 + 60
        assert "\n" in text


def test_same_seed_same_text_other_seed_differs_argmax_ignores_seed(sampler):
    first = sampler.sample("the ", 200, mode=1, seed=11)
    assert sampler.sample("the ", 200, mode=1, seed=11) == first
    assert sampler.sample("the ", 200, mode=1, seed=12) != first
    greedy = {sampler.sample("the ", 100, mode=0, seed=seed) for seed in (1, 2, 3)}
    assert len(greedy) == 1


@pytest.mark.slow
def test_cli_output_is_repeatable_with_a_seed(trained_save_dir):
    args = ("-n", 30, "--prime", "the", "--sample", 2, "--seed", 4, "--temperature", "1.5")
    assert sample_cli(trained_save_dir, *args) == sample_cli(trained_save_dir, *args)


@pytest.mark.slow
def test_cli_passes_every_flag_to_the_sampler(sampler, trained_save_dir):
    settings = dict(prime="the d", n=150, mode=2, temperature=1.7, seed=21, top_k=3)
    expected = sampler.sample(**settings)
    text = sample_cli(trained_save_dir, "--prime", "the d", "-n", 150, "--sample", 2, "--temperature", 1.7,
                      "--top_k", 3, "--seed", 21)
    assert text == expected
    # Each flag matters here: a flag left at its default would print something else.
    for change in [dict(mode=1), dict(temperature=1.0), dict(top_k=0), dict(seed=22), dict(n=149)]:
        assert sampler.sample(**{**settings, **change}) != expected, change


def test_cli_defaults_are_the_readmes():
    args = sample.build_parser().parse_args([])
    assert (args.save_dir, args.n, args.prime, args.sample, args.temperature, args.top_k, args.seed) == \
        ("save", 500, "The", 1, 1.0, 0, None)


def test_without_a_seed_every_sample_differs(sampler):
    texts = {sampler.sample("the ", 100, mode=1, temperature=1.5) for _ in range(3)}
    assert len(texts) == 3


def next_token_probabilities(sampler, prime_ids, temperature):
    model = sampler.generator.model
    logits, _ = model(tf.constant([prime_ids]), model.zero_state(1))
    return tf.nn.softmax(logits[0, -1] / temperature).numpy().astype(np.float64)


def sampled_counts(sampler, prime_ids, temperature, draws):
    """How often each token is drawn right after the prime, over `draws` seeds."""
    generate = sampler.generator.generate
    counts = np.zeros(len(sampler.vocab))
    prime = tf.constant(prime_ids, tf.int32)
    for seed in range(draws):
        token = generate(prime, tf.constant(1), tf.constant(temperature, tf.float32), tf.constant(1),
                         tf.constant(seed, tf.int64), tf.constant(0), tf.constant(1.0), tf.constant(0.0),
                         tf.constant(0.0))
        counts[int(token[0])] += 1
    return counts


def chi_square_p(counts, probabilities):
    """p-value of observed counts under the probabilities, pooling cells expected fewer than 5 times."""
    expected = probabilities * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] < 5:  # pool the small cells into the smallest large one instead
        observed, expected = observed[:-1], expected[:-1]
        observed[np.argmin(expected)] += counts[~big].sum()
        expected[np.argmin(expected)] += (probabilities[~big] * counts.sum()).sum()
    return stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


def test_sampled_frequencies_match_the_softmax_and_temperature_sharpens(sampler):
    prime = sampler.encode("the ca")  # a context whose next character is uncertain for a tiny model
    draws = 3000
    at_one = sampled_counts(sampler, prime, 1.0, draws)
    p_one = next_token_probabilities(sampler, prime, 1.0)
    assert chi_square_p(at_one, p_one) > 1e-3
    # The test has power: the same draws are rejected against the T=0.5 distribution (a sampler that
    # ignored temperature would be caught the same way).
    p_half = next_token_probabilities(sampler, prime, 0.5)
    assert chi_square_p(at_one, p_half) < 1e-6
    at_half = sampled_counts(sampler, prime, 0.5, draws)
    assert chi_square_p(at_half, p_half) > 1e-3
    entropy = lambda counts: stats.entropy(counts / counts.sum())
    assert entropy(at_half) < entropy(at_one)


def test_sample_on_spaces_only_departs_from_argmax_after_a_space(sampler):
    text = sampler.sample("the ", 400, mode=2, temperature=3.0, seed=9)
    ids = sampler.encode(text)
    model = sampler.generator.model
    logits, _ = model(tf.constant([ids[:-1]]), model.zero_state(1))
    greedy = tf.argmax(logits[0], axis=-1).numpy()
    start = len("the ") - 1  # predictions from the last prime character on are generated ones
    departures = [i for i in range(start, len(ids) - 1) if ids[i + 1] != greedy[i]]
    assert departures, "at temperature 3 some sampled choices should differ from argmax"
    assert all(text[i] == " " for i in departures)


def test_sample_on_spaces_samples_right_after_a_prime_that_ends_in_a_space(sampler):
    after_space = {sampler.sample("the ", 1, mode=2, temperature=3.0, seed=seed) for seed in range(20)}
    assert len(after_space) > 1
    after_letter = {sampler.sample("the", 1, mode=2, temperature=3.0, seed=seed) for seed in range(20)}
    assert after_letter == {sampler.sample("the", 1, mode=0)}


def test_word_level_sample_on_spaces_samples_every_word(word_save_dir):
    words = Sampler.load(word_save_dir)
    on_spaces = words.sample("the cat", 80, mode=2, temperature=1.5, seed=6)
    assert on_spaces == words.sample("the cat", 80, mode=1, temperature=1.5, seed=6)
    assert on_spaces != words.sample("the cat", 80, mode=0)


def test_argmax_follows_the_model_across_blocks(sampler, following_logits):
    text = sampler.sample("the d", 3 * GENERATE_BLOCK + 20, mode=0)
    logits, drawn = generated_positions(sampler, following_logits, "the d", text)
    assert len(drawn) == 3 * GENERATE_BLOCK + 20
    assert (drawn == logits.argmax(axis=1)).all()


def test_new_temperatures_lengths_and_seeds_trace_the_graph_once(trained_save_dir):
    sampler = Sampler.load(trained_save_dir)
    for temperature, n, seed, prime in [(0.5, 10, 1, "the"), (1.0, 25, 2, "a"), (1.7, 3, 3, "the cat"),
                                        (0.9, 40, 4, "t"), (2.5, 7, 5, "dog ")]:
        assert len(sampler.sample(prime, n, 1, temperature, seed, 3, 0.9)) == len(prime) + n
    # The block of tokens is traced once (XLA compiles it for one row).
    assert sampler.generator._packed_block.experimental_get_tracing_count() == 1


def test_a_sample_makes_one_compiled_call_per_block_and_no_step_past_n(sampler, monkeypatch):
    steps = []
    block = sampler.generator.batch_block

    def counted(*args, **kwargs):
        steps.append(args[0])
        return block(*args, **kwargs)

    monkeypatch.setattr(sampler.generator, "batch_block", counted)
    text = sampler.sample("the", 2 * GENERATE_BLOCK + 72, mode=1, seed=3)
    assert steps == [GENERATE_BLOCK, GENERATE_BLOCK + 72]  # the second block is twice as long, and stops at n
    # A shorter last block makes the same tokens: the sample is the start of a longer one.
    assert sampler.sample("the", 3 * GENERATE_BLOCK, mode=1, seed=3).startswith(text)


def test_a_prime_fed_again_gives_its_kept_state_and_the_oldest_kept_leaves_first(trained_save_dir):
    sampler = Sampler.load(trained_save_dir)
    generator = sampler.generator
    the, cat = sampler.encode("the"), sampler.encode("the cat")
    first = generator.feed_prime(the)
    assert generator.feed_prime(the) is first  # kept: the same state, not fed again
    previous, logits, states = first
    assert previous == the[-1] and not logits.flags.writeable and not states[0].flags.writeable
    generator._primes = PrimeStates(2)
    kept_the = generator.feed_prime(the)
    generator.feed_prime(cat)
    generator.feed_prime(the)  # used last: "the cat" is now the oldest
    generator.feed_prime(sampler.encode("a"))
    assert generator.feed_prime(the) is kept_the and generator._primes.get(np.int32(cat).tobytes()) is None
    for ids in (the, cat, sampler.encode("a")):  # each prime's own state, whichever was kept
        previous, logits, states = generator._prime_pass(tf.constant(ids, tf.int32))
        fed = generator.feed_prime(ids)
        assert fed[0] == int(previous) and np.array_equal(fed[1], logits.numpy())
        assert all(np.array_equal(kept, state.numpy()) for kept, state in zip(fed[2], states))


def test_top_k_one_is_argmax(sampler):
    assert sampler.sample("the ", 60, mode=1, temperature=2.0, seed=3, top_k=1) == sampler.sample("the ", 60, mode=0)


# Logits of the generator (XLA) and of the whole-sequence pass differ by rounding: ranks allow for it.
RANK_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def following_logits(sampler):
    """ids -> [len(ids), vocab]: the model's logits after each token, the sequence in one compiled pass."""
    model = sampler.generator.model
    run = tf.function(lambda ids: model(ids[tf.newaxis], model.zero_state(1))[0][0],
                      input_signature=[tf.TensorSpec([None], tf.int32)])
    return lambda ids: run(tf.constant(ids, tf.int32)).numpy().astype(np.float64)


def generated_positions(sampler, following_logits, prime, text):
    """(logits [positions, vocab], drawn ids [positions]) at each generated token of `text` (after `prime`)."""
    ids = sampler.encode(text)
    start = len(sampler.encode(prime))
    return following_logits(ids[:-1])[start - 1:], np.array(ids[start:])


def rank_counts(logits, drawn):
    """How often the token drawn was the likeliest, the second likeliest, ... at its position."""
    drawn_logits = logits[np.arange(len(drawn)), drawn]
    ranks = 1 + np.sum(logits > drawn_logits[:, np.newaxis] + RANK_TOLERANCE, axis=1)
    return np.bincount(ranks - 1, minlength=logits.shape[1])


def rank_probabilities(logits, temperature, top_k):
    """The expected share of each rank: the softmax at `temperature` of the top_k likeliest tokens (all when 0),
    renormalised, averaged over the positions."""
    ordered = -np.sort(-logits, axis=1) / temperature
    weights = np.exp(ordered - ordered[:, :1])
    if top_k:
        weights[:, top_k:] = 0
    return (weights / weights.sum(axis=1, keepdims=True)).mean(axis=0)


@pytest.mark.parametrize("top_k", [2, 3, 5])
def test_top_k_draws_exactly_the_k_likeliest_in_proportion(sampler, following_logits, top_k):
    # Every position of a long sample, so that the check covers every block, not only the first token.
    text = sampler.sample("the ", 3000, mode=1, temperature=2.0, seed=top_k, top_k=top_k)
    logits, drawn = generated_positions(sampler, following_logits, "the ", text)
    counts = rank_counts(logits, drawn)
    assert counts[top_k:].sum() == 0, counts  # never a token outside the k likeliest
    assert (counts[:top_k] > 0).all(), counts  # and each of the k likeliest is drawn
    assert chi_square_p(counts[:top_k], rank_probabilities(logits, 2.0, top_k)[:top_k]) > 1e-4
    # The test has power: the same draws are rejected against the proportions without top_k, or of top_k + 1.
    assert chi_square_p(counts, rank_probabilities(logits, 2.0, 0)) < 1e-8
    assert chi_square_p(counts[:top_k + 1], rank_probabilities(logits, 2.0, top_k + 1)[:top_k + 1]) < 1e-8


def test_top_p_keeps_exactly_the_smallest_set_of_likeliest_tokens_that_reaches_p_after_top_k():
    # Probabilities 0.5, 0.3, 0.15, 0.05 (in shuffled token order): the fewest likeliest tokens reaching p.
    probabilities = np.array([0.15, 0.5, 0.05, 0.3])
    logits = tf.constant(np.log(probabilities), tf.float32)
    by_rank = [1, 3, 0, 2]  # token ids from the likeliest
    cases = [(0, 0.3, 1), (0, 0.5, 1), (0, 0.55, 2), (0, 0.79, 2), (0, 0.81, 3), (0, 0.94, 3), (0, 0.96, 4),
             (0, 1.0, 4),
             # top-k first, then top-p over the k kept: among 0.5, 0.3, 0.15, 0.81 is reached by two tokens
             (3, 0.81, 2), (2, 0.96, 2), (3, 1.0, 3), (1, 0.3, 1)]
    for top_k, top_p, kept in cases:
        masked = sampler_module.keep_top_k_top_p(logits[tf.newaxis], tf.constant([top_k]),
                                                 tf.constant([top_p]))[0].numpy()
        assert sorted(np.flatnonzero(np.isfinite(masked))) == sorted(by_rank[:kept]), (top_k, top_p)
        assert np.array_equal(masked[np.isfinite(masked)], logits.numpy()[np.isfinite(masked)])


@pytest.mark.parametrize("top_p", [0.5, 0.8])
def test_top_p_draws_only_the_nucleus_in_proportion(sampler, following_logits, top_p):
    text = sampler.sample("the ", 3000, mode=1, temperature=2.0, seed=17, top_p=top_p)
    logits, drawn = generated_positions(sampler, following_logits, "the ", text)
    # Each position's nucleus: the fewest likeliest whose probabilities (at the temperature) reach top_p.
    ordered = -np.sort(-logits, axis=1) / 2.0
    probabilities = np.exp(ordered - ordered[:, :1])
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    likelier = np.cumsum(probabilities, axis=1) - probabilities
    nucleus = (likelier < top_p).sum(axis=1)
    drawn_logits = logits[np.arange(len(drawn)), drawn]
    ranks = np.sum(logits > drawn_logits[:, np.newaxis] + RANK_TOLERANCE, axis=1)  # 0: the likeliest
    assert (ranks < nucleus).all()  # never a token outside the nucleus of its position
    # In proportion within it: the expected share of each rank, renormalised over each position's nucleus.
    weights = np.where(np.arange(logits.shape[1]) < nucleus[:, np.newaxis], probabilities, 0)
    expected = (weights / weights.sum(axis=1, keepdims=True)).mean(axis=0)
    counts = np.bincount(ranks, minlength=logits.shape[1])
    used = expected > 0
    assert chi_square_p(counts[used], expected[used]) > 1e-4
    # Power: the same draws are rejected against the proportions without top_p.
    assert chi_square_p(counts, rank_probabilities(logits, 2.0, 0)) < 1e-8


def test_frequencies_over_every_position_match_the_softmax_at_each_temperature(sampler, following_logits):
    for temperature in (0.6, 1.0, 1.8):
        text = sampler.sample("the ", 3000, mode=1, temperature=temperature, seed=13)
        logits, drawn = generated_positions(sampler, following_logits, "the ", text)
        counts = rank_counts(logits, drawn)
        assert chi_square_p(counts, rank_probabilities(logits, temperature, 0)) > 1e-4, temperature
        # Power: the same draws are rejected against a temperature a quarter lower or higher.
        for other in (temperature * 0.75, temperature * 1.25):
            assert chi_square_p(counts, rank_probabilities(logits, other, 0)) < 1e-8, (temperature, other)


def test_draws_do_not_repeat_from_block_to_block(sampler):
    # At temperature 100 every token is a nearly uniform draw from the 15 characters: a stretch of 10 characters
    # that comes back means draws that come back, as they would if a block of GENERATE_BLOCK tokens reused the
    # random numbers of another.
    text = sampler.sample("the ", 6 * GENERATE_BLOCK, mode=1, temperature=100.0, seed=8)[len("the "):]
    assert text[GENERATE_BLOCK:2 * GENERATE_BLOCK] != text[:GENERATE_BLOCK]
    stretches = [text[i:i + 10] for i in range(len(text) - 10 + 1)]
    assert len(set(stretches)) == len(stretches)
    assert set(text) == set(sampler.vocab)


def test_limits_of_n_seed_and_top_k(sampler):
    assert sampler.sample("the", 0, seed=1) == "the"
    assert sampler.sample("the", 1, mode=0) == sampler.sample("the", 5, mode=0)[:4]
    check_settings(SampleSettings("", MAX_N, 1, 1.0, MAX_SEED, MAX_N))  # the largest values are accepted
    # top_k of the vocabulary size or more keeps every token: the same text as top_k 0.
    everything = sampler.sample("the ", 200, mode=1, temperature=1.5, seed=MAX_SEED)
    for top_k in (len(sampler.vocab), MAX_N):
        assert sampler.sample("the ", 200, mode=1, temperature=1.5, seed=MAX_SEED, top_k=top_k) == everything
    assert sampler.sample("the ", 200, mode=1, temperature=1.5, seed=MAX_SEED, top_k=len(sampler.vocab) - 1) \
        != everything
    for arguments, reason in [(dict(n=MAX_N + 1), "n must be"), (dict(n=-1), "n must be"),
                              (dict(seed=MAX_SEED + 1), "seed must be"), (dict(seed=-1), "seed must be"),
                              (dict(top_k=MAX_N + 1), "top_k must be"), (dict(top_k=2 ** 32 + 5), "top_k must be"),
                              (dict(top_k=-1), "top_k must be")]:
        with pytest.raises(ValueError, match=reason):
            sampler.sample("the", **{"n": 5, **arguments})


def test_time_per_token_does_not_grow_with_n(sampler):
    sampler.sample("the", 10, seed=1)  # warm-up
    timings = {}
    for n in (500, 5000):
        start = tf.timestamp()
        sampler.sample("the", n, seed=1)
        timings[n] = float(tf.timestamp() - start) / n
    assert timings[5000] < 3 * timings[500]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--prime", "thé zq€"], "'é', 'z', 'q', '€'"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["-n", "-5"], "-n"),
    (["-n", str(2 ** 30 + 1)], "error: n must be an integer from 0 to 1073741824"),
    # Larger than int32: refused in one line, never wrapped round (2**32 + 5 would sample with top_k 5).
    (["--top_k", str(2 ** 32 + 5)], "error: top_k must be an integer from 0 to 1073741824"),
    (["--top_k", "-1"], "--top_k"),
])
def test_bad_arguments_exit_2_with_one_line(trained_save_dir, args, message):
    result = run_script("sample.py", "--save_dir", trained_save_dir, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1]  # the reason ends stderr (after argparse's usage)
    if message.startswith("error: "):  # refused by the sampler: one line only
        assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_unknown_word_is_named(word_save_dir):
    result = run_script("sample.py", "--save_dir", word_save_dir, "--prime", "the zebra")
    assert result.returncode == 2
    assert "'zebra'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_empty_prime_starts_at_a_new_line(sampler, trained_save_dir):
    text = sample_cli(trained_save_dir, "--prime", "", "-n", 30, "--seed", 1)
    assert len(text) == 30
    assert sampler.sample("", 30, seed=1) == text


def test_empty_prime_samples_what_follows_a_line_break(sampler, word_save_dir):
    for mode, seed in [(0, None), (1, 1), (1, 2), (2, 3)]:
        empty = sampler.sample("", 60, mode=mode, temperature=1.2, seed=seed)
        assert empty == sampler.sample("\n", 60, mode=mode, temperature=1.2, seed=seed)[1:]
    # Not what follows a space (the test can tell them apart).
    assert sampler.sample("", 60, seed=1) != sampler.sample(" ", 60, seed=1)[1:]
    words = Sampler.load(word_save_dir)
    assert words.sample("", 40, seed=4) == words.sample("\n", 40, seed=4)[1:]


def test_empty_prime_without_line_breaks_starts_from_the_most_frequent_token(tmp_path):
    text = "the cat sat on the mat. " * 60  # no line break; the space is the most frequent character
    save = str(tmp_path / "save")
    assert train.main(["--data_dir", make_data_dir(tmp_path / "data", text), "--save_dir", save, *TINY_MODEL,
                       "--num_epochs", "1", "--print_every", "100", "--seed", "3"]) == 0
    one_line = Sampler.load(save)
    assert "\n" not in one_line.vocab and one_line.vocab[0] == " "
    for mode, seed in [(0, None), (1, 1), (1, 2)]:
        empty = one_line.sample("", 60, mode=mode, temperature=1.5, seed=seed)
        assert empty == one_line.sample(" ", 60, mode=mode, temperature=1.5, seed=seed)[1:]
    assert one_line.sample("", 60, seed=1) != one_line.sample("t", 60, seed=1)[1:]


@pytest.mark.slow
def test_missing_save_dir_or_checkpoint_exits_1_never_random_weights(tmp_path, trained_save_dir):
    result = run_script("sample.py", "--save_dir", tmp_path / "nowhere")
    assert result.returncode == 1 and "does not exist" in result.stderr and result.stdout == ""
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("config.yaml", "vocab.json"):
        (empty / name).write_bytes(open(os.path.join(trained_save_dir, name), "rb").read())
    result = run_script("sample.py", "--save_dir", empty)
    assert result.returncode == 1 and "no checkpoint" in result.stderr and result.stdout == ""
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_word_level_flag_only_warns_on_a_character_model(trained_save_dir):
    result = run_script("sample.py", "--save_dir", trained_save_dir, "--word_level", "--prime", "the", "-n", 5)
    assert result.returncode == 0
    assert "--word_level ignored" in result.stderr
    assert len(result.stdout) == len("the") + 5 + 1
