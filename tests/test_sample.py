"""sample.py and the generator: output, repeatability, the sampling distribution, no retracing, errors."""
import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import train
from conftest import TINY_MODEL, make_data_dir, run_script
from sampler import Sampler

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


def test_prints_prime_then_n_characters_from_latest_and_best(trained_save_dir):
    for save_dir in (trained_save_dir, os.path.join(trained_save_dir, "best")):
        text = sample_cli(save_dir, "-n", 40, "--prime", "the ", "--seed", 5)
        assert text.startswith("the ") and len(text) == 4 + 40


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


def test_cli_output_is_repeatable_with_a_seed(trained_save_dir):
    args = ("-n", 30, "--prime", "the", "--sample", 2, "--seed", 4, "--temperature", "1.5")
    assert sample_cli(trained_save_dir, *args) == sample_cli(trained_save_dir, *args)


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
                         tf.constant(seed, tf.int64), tf.constant(0))
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


def test_new_temperatures_lengths_and_seeds_trace_the_graph_once(trained_save_dir):
    sampler = Sampler.load(trained_save_dir)
    for temperature, n, seed, prime in [(0.5, 10, 1, "the"), (1.0, 25, 2, "a"), (1.7, 3, 3, "the cat"),
                                        (0.9, 40, 4, "t"), (2.5, 7, 5, "dog ")]:
        assert len(sampler.sample(prime, n, 1, temperature, seed)) == len(prime) + n
    assert sampler.generator.generate.experimental_get_tracing_count() == 1


def test_top_k_one_is_argmax(sampler):
    assert sampler.sample("the ", 60, mode=1, temperature=2.0, seed=3, top_k=1) == sampler.sample("the ", 60, mode=0)


def test_time_per_token_does_not_grow_with_n(sampler):
    sampler.sample("the", 10, seed=1)  # warm-up
    timings = {}
    for n in (500, 5000):
        start = tf.timestamp()
        sampler.sample("the", n, seed=1)
        timings[n] = float(tf.timestamp() - start) / n
    assert timings[5000] < 3 * timings[500]


@pytest.mark.parametrize("args, message", [
    (["--prime", "thé zq€"], "'é', 'z', 'q', '€'"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["-n", "-5"], "-n"),
])
def test_bad_arguments_exit_2_with_one_line(trained_save_dir, args, message):
    result = run_script("sample.py", "--save_dir", trained_save_dir, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_unknown_word_is_named(word_save_dir):
    result = run_script("sample.py", "--save_dir", word_save_dir, "--prime", "the zebra")
    assert result.returncode == 2
    assert "'zebra'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_empty_prime_starts_at_a_new_line(sampler, trained_save_dir):
    text = sample_cli(trained_save_dir, "--prime", "", "-n", 30, "--seed", 1)
    assert len(text) == 30
    assert sampler.sample("", 30, seed=1) == text


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


def test_word_level_flag_only_warns_on_a_character_model(trained_save_dir):
    result = run_script("sample.py", "--save_dir", trained_save_dir, "--word_level", "--prime", "the", "-n", 5)
    assert result.returncode == 0
    assert "--word_level ignored" in result.stderr
    assert len(result.stdout) == len("the") + 5 + 1
