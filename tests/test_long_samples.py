"""Long samples: Generator.blocks makes a sample in blocks that grow from GENERATE_BLOCK to LONGEST_BLOCK tokens
(sampler.block_schedule), and the texts are those of blocks of GENERATE_BLOCK, as generate() (the graph loop that
the export saves) makes them: every mode, top-k, top-p, stop strings, several samples and the stream, across the
boundaries of every block size used."""
import pytest
import tensorflow as tf

from sampler import GENERATE_BLOCK, LONGEST_BLOCK, Sampler, block_schedule
from settings import MODE_ARGMAX, MODE_SAMPLE, MODE_SAMPLE_ON_SPACES, SampleSettings

# Where the blocks have grown to LONGEST_BLOCK and made one of it: 128 + 256 + ... + 8192 tokens.
GROWN = 2 * LONGEST_BLOCK - GENERATE_BLOCK
# Every block size of the schedule, then the boundary between two blocks of LONGEST_BLOCK, and a shorter last block.
LONG_N = GROWN + LONGEST_BLOCK + 37
PRIME = "the "


@pytest.fixture(scope="module")
def sampler(trained_save_dir):
    return Sampler.load(trained_save_dir)


def in_blocks_of_128(sampler, settings):
    """The text of `settings` (one row) as generate() makes it: blocks of GENERATE_BLOCK in one graph loop."""
    ids = sampler.generator.generate(
        tf.constant(sampler.encode(settings.prime), tf.int32), tf.constant(settings.n),
        tf.constant(settings.temperature, tf.float32), tf.constant(settings.mode), tf.constant(settings.seed, tf.int64),
        tf.constant(settings.top_k), tf.constant(settings.top_p, tf.float32),
        tf.constant(settings.frequency_penalty, tf.float32), tf.constant(settings.presence_penalty, tf.float32)).numpy()
    return sampler.join(settings.prime, [sampler.vocab[i] for i in ids])


def first_only_at(text, start):
    """The shortest piece of `text` from `start` whose first occurrence in `text` is there."""
    return next(text[start:end] for end in range(start + 1, len(text)) if text.find(text[start:end]) == start)


def test_blocks_start_at_generate_block_double_up_to_longest_block_and_end_at_n():
    for n in (1, GENERATE_BLOCK - 1, GENERATE_BLOCK, GENERATE_BLOCK + 1, 500, GROWN, LONG_N, 200_010):
        blocks = list(block_schedule(n))
        positions = [position for position, _ in blocks]
        steps = [steps for _, steps in blocks]
        assert positions == [sum(steps[:i]) for i in range(len(steps))] and sum(steps) == n, n
        assert steps[0] == min(GENERATE_BLOCK, n) and max(steps) <= LONGEST_BLOCK, n
        full = [min(GENERATE_BLOCK * 2 ** i, LONGEST_BLOCK) for i in range(len(steps))]
        assert steps[:-1] == full[:-1] and steps[-1] <= full[-1], n
    assert sorted(set(steps for _, steps in block_schedule(LONG_N))) == sorted(
        {GENERATE_BLOCK * 2 ** i for i in range(7)} | {37})  # 128 to 8192, each used, and a last block of 37


@pytest.mark.parametrize("mode, temperature, top_k, top_p, penalties", [
    (MODE_ARGMAX, 1.0, 0, 1.0, (0.0, 0.0)), (MODE_SAMPLE, 1.3, 0, 1.0, (0.0, 0.0)),
    (MODE_SAMPLE_ON_SPACES, 1.3, 0, 1.0, (0.0, 0.0)), (MODE_SAMPLE, 1.5, 3, 1.0, (0.0, 0.0)),
    (MODE_SAMPLE, 1.5, 0, 0.8, (0.0, 0.0)), (MODE_SAMPLE, 1.0, 0, 1.0, (0.001, 0.5))])  # counts carried across blocks
def test_a_long_sample_is_the_text_of_blocks_of_128_in_every_mode_with_top_k_and_top_p(
        sampler, mode, temperature, top_k, top_p, penalties):
    settings = SampleSettings(PRIME, LONG_N, mode, temperature, 5, top_k, top_p, *penalties)
    text = sampler.run(settings)
    assert len(text) == len(PRIME) + LONG_N
    assert text == in_blocks_of_128(sampler, settings)


def test_the_stream_gives_each_block_as_it_is_made_and_stops_at_a_stop_string_in_a_long_block(
        sampler, monkeypatch):
    settings = SampleSettings(PRIME, LONG_N, MODE_SAMPLE, 2.5, 8)
    expected = in_blocks_of_128(sampler, settings)
    pieces = list(sampler.stream(settings))
    # The prime at once, then one piece per block, the first after GENERATE_BLOCK tokens.
    assert pieces[0] == PRIME and "".join(pieces) == expected
    assert [len(piece) for piece in pieces[1:-1]] == [steps for _, steps in block_schedule(LONG_N)]
    generated = expected[len(PRIME):]
    calls = []
    block = sampler.generator.batch_block
    monkeypatch.setattr(sampler.generator, "batch_block", lambda *args: calls.append(args[0]) or block(*args))
    for start in (GROWN - 3, GROWN + 2000):  # across the boundary of two blocks of LONGEST_BLOCK, and inside one
        stop = first_only_at(generated, start)
        calls.clear()
        assert sampler.run(settings, [stop]) == PRIME + generated[:start]
        assert "".join(sampler.stream(settings, [stop])) == PRIME + generated[:start]
        made = calls[:len(calls) // 2]  # the run's blocks (the stream's are the same)
        assert sum(made[:-1]) < start + len(stop) <= sum(made), made  # none after the block the stop ends in


def test_several_long_samples_are_each_the_text_of_its_seed(sampler):
    settings = SampleSettings(PRIME, LONG_N, MODE_SAMPLE, 2.5, 40, 5, 0.95)
    samples = sampler.run_many(settings, 3)
    expected = [in_blocks_of_128(sampler, SampleSettings(PRIME, LONG_N, MODE_SAMPLE, 2.5, seed, 5, 0.95))
                for seed in (40, 41, 42)]
    assert samples == list(zip((40, 41, 42), expected))
    # With stop strings each sample ends at its own first occurrence, wherever the block it falls in.
    stops = [first_only_at(expected[0][len(PRIME):], GROWN - 2)]
    for (_, cut), full in zip(sampler.run_many(settings, 3, stops), expected):
        generated = full[len(PRIME):]
        found = generated.find(stops[0])
        assert cut == (PRIME + generated[:found] if found >= 0 else full)
