"""batching.Batcher in this process: requests generated as the rows of one batch get the text each gets alone,
join and leave at block boundaries, and are refused or turned away when full or shutting down."""
import threading

import numpy as np
import pytest

from batching import (
    MIN_BLOCK_STEPS,
    Batcher,
    BatcherPool,
    OneAtATime,
    block_steps,
    bucket,
    default_batchers,
    split,
)
from errors import Busy, GenerationStopped
from sampler import GENERATE_BLOCK, Sampler
from settings import SampleSettings

# Different primes, lengths (within one block, exactly one, just over, several), modes and filters.
REQUESTS = [
    SampleSettings("the", 1, mode=1, seed=1),
    SampleSettings("the cat", GENERATE_BLOCK, mode=1, temperature=0.7, seed=2),
    SampleSettings("", GENERATE_BLOCK + 1, mode=2, seed=3),
    SampleSettings("dog", 3 * GENERATE_BLOCK + 5, mode=0, seed=4),
    SampleSettings("the mat", 200, mode=1, temperature=1.3, top_k=3, seed=5),
    SampleSettings("a", 150, mode=1, top_p=0.6, seed=2 ** 40 + 6),
]


@pytest.fixture(scope="module")
def sampler(trained_save_dir):
    return Sampler.load(trained_save_dir)


@pytest.fixture(scope="module")
def alone(sampler):
    return [sampler.run(settings) for settings in REQUESTS]


def started(batcher):
    """Record the rows of each block the batcher runs."""
    blocks = []
    batcher.on_block = lambda rows, tokens: blocks.append(rows)
    return blocks


def test_rows_with_their_own_settings_get_what_each_gets_alone(sampler, alone):
    batcher = Batcher(sampler, max_batch=8, max_wait_s=0.5, max_waiting=8)
    blocks = started(batcher)
    generations = [batcher.submit(settings) for settings in REQUESTS]
    assert ["".join(generation) for generation in generations] == alone
    assert blocks[0] == len(REQUESTS)  # the first block had every row; rows left as they finished
    assert blocks == sorted(blocks, reverse=True) and blocks[-1] == 1
    batcher.close()


def test_a_request_that_arrives_later_joins_at_the_next_block(sampler, alone):
    batcher = Batcher(sampler, max_batch=4, max_wait_s=0, max_waiting=4)
    blocks = started(batcher)
    long = batcher.submit(SampleSettings("the", 40 * GENERATE_BLOCK, mode=1, seed=9))
    pieces = iter(long)
    next(pieces), next(pieces)  # the prime, then its first block: it is generating
    late = batcher.submit(REQUESTS[4])
    assert "".join(late) == alone[4]  # done long before the long one
    assert 2 in blocks and len(blocks) < 40
    assert "".join([next(pieces) for _ in range(2)]) and "".join(pieces)  # the long one goes on to its end
    assert blocks[-1] == 1
    batcher.close()


def test_a_closed_generation_frees_its_row_for_the_next_request(sampler, alone):
    batcher = Batcher(sampler, max_batch=1, max_wait_s=0, max_waiting=1)
    endless = batcher.submit(SampleSettings("the", 10 ** 8, mode=1, seed=1))  # hours at this speed
    next(iter(endless))
    waiting = batcher.submit(REQUESTS[1])
    with pytest.raises(Busy, match="busy: 1 requests are generating and 1 waiting"):
        batcher.submit(REQUESTS[2])
    endless.close()  # its client left
    assert "".join(waiting) == alone[1]
    assert batcher.rows == 0 and endless.made < 10 ** 8
    batcher.close()


def test_close_finishes_the_rows_and_turns_away_the_waiting(sampler, alone):
    batcher = Batcher(sampler, max_batch=1, max_wait_s=0, max_waiting=2)
    generating = batcher.submit(REQUESTS[3])
    pieces = iter(generating)
    made = next(pieces) + next(pieces)  # the prime, then the first block: it is generating
    waiting = batcher.submit(REQUESTS[4])
    batcher.close()
    assert made + "".join(pieces) == alone[3]
    with pytest.raises(GenerationStopped, match="shutting down"):
        "".join(waiting)
    with pytest.raises(GenerationStopped, match="shutting down"):
        batcher.submit(REQUESTS[0])


def test_a_stop_string_ends_a_rows_text_and_frees_its_row_in_both_schedulers(sampler):
    # An hours-long request with a stop string that comes soon: its text is Sampler.run's with the same stop, and it
    # ends at that block, leaving its row (and with it the batch) to the next request.
    settings, stops = SampleSettings("the", 10 ** 8, mode=1, seed=4), ("at", "\n")
    expected = sampler.run(settings, stops)
    unstopped = sampler.run(SampleSettings("the", 2 * GENERATE_BLOCK, mode=1, seed=4))
    cuts = [cut for cut in (unstopped.find(stop, len("the")) for stop in stops) if cut >= 0]
    assert cuts and expected == unstopped[:min(cuts)]  # a stop string cut it
    batcher = Batcher(sampler, max_batch=1, max_wait_s=0, max_waiting=1)
    one_at_a_time = OneAtATime(sampler, running=1, waiting=0)
    for scheduler in (batcher, one_at_a_time):
        generation = scheduler.submit(settings, stops)
        assert "".join(generation) == expected and generation.stopped
        plain = scheduler.submit(REQUESTS[0])
        assert "".join(plain) == sampler.run(REQUESTS[0]) and not plain.stopped
    assert batcher.rows == 0
    batcher.close()


def test_bad_settings_are_refused_before_taking_a_place(sampler):
    batcher = Batcher(sampler, max_batch=1, max_wait_s=0, max_waiting=0)
    with pytest.raises(ValueError, match="temperature"):
        batcher.submit(SampleSettings("the", 5, temperature=-1.0))
    with pytest.raises(ValueError, match="does not know"):
        batcher.submit(SampleSettings("THE", 5))
    assert "".join(batcher.submit(REQUESTS[0]))  # the place is still free
    batcher.close()


def test_many_threads_submitting_at_once_each_get_their_text(sampler, alone):
    batcher = Batcher(sampler, max_batch=4, max_wait_s=0.001, max_waiting=16)
    answers = [None] * 16

    def client(i):
        answers[i] = "".join(batcher.submit(REQUESTS[i % len(REQUESTS)]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == [alone[i % len(REQUESTS)] for i in range(16)]
    batcher.close()


def test_a_block_ends_when_its_first_row_is_done(sampler):
    batcher = Batcher(sampler, max_batch=4, max_wait_s=0.5, max_waiting=4)
    blocks = []
    batcher.on_block = lambda rows, tokens: blocks.append((rows, tokens))
    settings = [SampleSettings("dog", 3 * GENERATE_BLOCK, mode=1, seed=7), SampleSettings("the", 40, mode=1, seed=8)]
    generations = [batcher.submit(one) for one in settings]
    assert ["".join(generation) for generation in generations] == [sampler.run(one) for one in settings]
    # Both rows for the short one's 40 steps, then the long one alone in whole blocks.
    assert blocks == [(2, 80), (1, GENERATE_BLOCK), (1, GENERATE_BLOCK), (1, GENERATE_BLOCK - 40)]
    batcher.close()


def test_a_lone_clients_next_request_starts_at_once_and_clients_together_wait_for_each_other(sampler, alone):
    batcher = Batcher(sampler, max_batch=4, max_wait_s=0, max_waiting=4)
    blocks = started(batcher)
    try:
        assert "".join(batcher.submit(REQUESTS[1])) == alone[1]  # a batch of one row: its client was alone
        batcher.max_wait_s = 3600  # a request that waited for others now would wait an hour
        answers = []
        lone = threading.Thread(target=lambda: answers.append("".join(batcher.submit(REQUESTS[4]))), daemon=True)
        lone.start()
        lone.join(timeout=60)
        assert answers == [alone[4]]
        # A second client joins a running request: the batch has two rows, and the next idle start waits for
        # others again (here until its four rows are filled).
        running = batcher.submit(REQUESTS[3])
        pieces = iter(running)
        made = next(pieces) + next(pieces)  # the prime, then its first block: it is generating
        assert "".join(batcher.submit(REQUESTS[0])) == alone[0]
        assert made + "".join(pieces) == alone[3]
        blocks.clear()
        generations = [batcher.submit(settings) for settings in REQUESTS[:4]]
        assert ["".join(generation) for generation in generations] == alone[:4]
        assert blocks[0] == 4
    finally:
        batcher.close()


def test_block_steps_stop_at_the_first_row_done_but_not_below_the_least():
    assert block_steps([3 * GENERATE_BLOCK]) == GENERATE_BLOCK
    assert block_steps([200, 72]) == 72
    assert block_steps([200, 5]) == MIN_BLOCK_STEPS  # shorter blocks cost more than the steps they save
    assert block_steps([5]) == 5 and block_steps([5, 10]) == 10  # never past the last row's end


def test_row_counts_are_padded_to_powers_of_two_up_to_the_largest_batch():
    assert [bucket(rows, 32) for rows in (1, 2, 3, 5, 8, 9, 31, 32)] == [1, 2, 4, 8, 8, 16, 32, 32]
    assert [bucket(rows, 12) for rows in (7, 9, 12)] == [8, 12, 12]


def test_a_pool_sends_requests_to_the_least_loaded_batcher_and_each_gets_its_text(sampler, alone):
    blocks = []
    # Each batching thread waits (up to 5 s) for its 2 rows to fill before its first block.
    pool = BatcherPool(sampler, max_batch=4, max_wait_s=5, max_waiting=2, count=2,
                       on_block=lambda rows, tokens: blocks.append((threading.current_thread().ident, rows)))
    generations = [pool.submit(settings) for settings in REQUESTS[:4]]
    assert pool.rows + pool.waiting <= 4
    assert ["".join(generation) for generation in generations] == alone[:4]
    first_blocks = {}
    for thread, rows in blocks:
        first_blocks.setdefault(thread, rows)
    assert list(first_blocks.values()) == [2, 2]  # both threads ran blocks, each with its 2 of the 4 requests
    pool.close()


def test_a_full_pool_is_busy_with_its_totals(sampler):
    pool = BatcherPool(sampler, max_batch=2, max_wait_s=0, max_waiting=0, count=2)
    endless = [pool.submit(SampleSettings("the", 10 ** 8, mode=1, seed=seed)) for seed in (1, 2)]
    with pytest.raises(Busy, match="busy: 2 requests are generating and 0 waiting"):
        pool.submit(REQUESTS[0])
    for generation in endless:
        generation.close()
    pool.close()


def test_the_rows_are_split_between_one_batching_thread_per_core_with_16_rows_or_more():
    assert split(33, 2) == [17, 16] and split(4, 4) == [1, 1, 1, 1] and split(0, 2) == [0, 0]
    assert default_batchers(32, cores=2) == 2 and default_batchers(32, cores=16) == 2
    assert default_batchers(8, cores=4) == 1 and default_batchers(256, cores=4) == 4
    assert default_batchers(1, cores=1) == 1
    with pytest.raises(ValueError, match="from 1 to max_batch"):
        BatcherPool(None, max_batch=2, max_wait_s=0, max_waiting=0, count=3)




BURST_ROUNDS = 10
BARRIER_TIMEOUT_S = 60


class OverlappingChecks:
    """The sampler, with each request's check (prepare) held until `count` requests are in it: their checks
    overlap, as they do on a busy server where any thread may be paused anywhere."""

    def __init__(self, sampler, count):
        self._sampler = sampler
        self._together = threading.Barrier(count, timeout=BARRIER_TIMEOUT_S)

    def __getattr__(self, name):
        return getattr(self._sampler, name)

    def prepare(self, *args):
        self._together.wait()
        return self._sampler.prepare(*args)


def test_a_burst_of_exactly_the_pools_places_gets_no_busy_many_times_over(sampler):
    # 2 threads of 2 rows and 2 waiting places each: 8 requests released at once fill the pool exactly, and each
    # must find a place however their choices interleave.
    places = 8
    checks = OverlappingChecks(sampler, places)
    for _ in range(BURST_ROUNDS):
        pool = BatcherPool(checks, max_batch=4, max_wait_s=0, max_waiting=4, count=2)
        start = threading.Barrier(places, timeout=BARRIER_TIMEOUT_S)
        answers = [None] * places

        def client(i):
            start.wait()
            try:
                answers[i] = pool.submit(SampleSettings("the", 10 ** 8, mode=1, seed=i))  # hours: none ends early
            except Busy as busy:
                answers[i] = busy

        threads = [threading.Thread(target=client, args=(i,)) for i in range(places)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        loads = [batcher.load for batcher in pool.batchers]
        for answer in answers:
            if not isinstance(answer, Busy):
                answer.close()
        pool.close()
        assert not any(isinstance(answer, Busy) for answer in answers), answers
        assert loads == [4, 4]  # every place taken, each batching thread's own


def test_a_rows_penalties_and_logprobs_are_its_own_beside_rows_without_them(sampler, alone):
    # Rows with penalties and logprobs in the batch of REQUESTS: each row gets its text (and logprobs) alone, and
    # the other rows, run in the block that scores every row, get theirs unchanged.
    own = [SampleSettings("the", 170, mode=1, frequency_penalty=0.8, presence_penalty=-0.5, seed=7),
           SampleSettings("cat", 140, mode=0, presence_penalty=1.5, logprobs=3, seed=8)]
    expected = [sampler.samples(settings, 1)[0] for settings in own]
    batcher = Batcher(sampler, max_batch=8, max_wait_s=0.5, max_waiting=8)
    generations = [batcher.submit(settings) for settings in REQUESTS + own]
    pieces = [list(generation.pieces()) for generation in generations]
    assert ["".join(text for text, _ in found) for found in pieces] == alone + [sample.text for sample in expected]
    batched_logprobs = [detail for _, details in pieces[-1] for detail in details]
    assert [detail.token for detail in batched_logprobs] == [detail.token for detail in expected[1].logprobs]
    np.testing.assert_allclose([detail.logprob for detail in batched_logprobs],
                               [detail.logprob for detail in expected[1].logprobs], atol=1e-5)
    assert all(not details for found in pieces[:-1] for _, details in found)
    batcher.close()


def test_without_batching_a_request_gets_the_pieces_and_logprobs_of_the_sampler(sampler):
    settings = SampleSettings("the", 150, mode=1, frequency_penalty=0.5, logprobs=2, seed=9)
    generation = OneAtATime(sampler, running=1, waiting=1).submit(settings)
    assert list(generation.pieces()) == list(sampler.pieces(settings))
