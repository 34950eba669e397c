"""Continuous batching for the sampling server: concurrent requests generated together, as the rows of one
compiled block of the sampling loop.

Batcher(sampler, max_batch, max_wait_s, max_waiting) runs one thread. submit(settings, stops) checks the settings
and returns a Generation at once; iterating it yields the request's text piece by piece (the prime, then the text of
each block of at most GENERATE_BLOCK tokens) as the thread makes them; its pieces() yields each piece with the
TokenLogprob of the tokens that begin in it (with settings.logprobs > 0; a block is scored when one of its rows
asks). Between two blocks the thread takes the
requests that arrived (feeding each one's prime) and drops the rows that are done or whose client left, so a short
request never waits for a long one to end. Each row keeps its own prime, sampling settings (the seed among them) and
position in its sample, so its text is the one sample.py makes for the same settings: the rows share the matrix
products of the model's step and nothing else.

A block runs until its first row is done (at least MIN_BLOCK_STEPS steps), so that the row's place goes to a
waiting request at once rather than idling to the end of a longer block. Row counts are padded up to a power of two
(or max_batch), so that XLA compiles the block for a few shapes only.

BatcherPool runs several Batchers over the one Sampler, each on its own thread with its share of the rows, and
sends each request to the least loaded: XLA runs a block on one core, so one batching thread leaves the other
cores to the requests' own work (at 32 clients on 2 cores, two threads served 172 to 229 requests/s where one
served 147 to 158).

OneAtATime is the server's scheduler without batching (--max_batch 0): each request generates alone on its own
thread, a few at once, with the same submit() and the same refusals (Busy, GenerationStopped) as the Batcher.
"""
import contextlib
import queue
import threading
import time

import numpy as np

from errors import Busy, GenerationStopped
from sample_text import SampleText
from sampler import GENERATE_BLOCK, row_settings

_DONE = object()  # the end of a Generation's pieces


MIN_ROWS_PER_BATCHER = 16  # default_batchers gives a thread no fewer rows: fewer share too little of the products
# A block ends no sooner: each costs about 2 ms however short (on 2 cores, at 3 x 128), as much as ten steps.
MIN_BLOCK_STEPS = 16
SLOT_POLL_S = 0.1  # how often a request of OneAtATime waiting for a turn checks whether it was closed


class Generation:
    """One request in the batcher. Iterate it for the text pieces (or pieces() for (text, [TokenLogprob]));
    close() it when its client leaves early, and its row is freed before the next block. settings are those it
    draws with (Sampler.prepare: the seed picked when none was given); made counts the tokens made so far."""

    def __init__(self, text, settings, ids):
        self.text, self.settings, self.ids = text, settings, ids
        self.made = 0
        self.cancelled = self.finished = False
        self.row = None  # its _Row, once its prime is fed
        self._pieces = queue.SimpleQueue()

    def __iter__(self):
        for piece, _ in self.pieces():
            yield piece

    def pieces(self):
        """The pieces of text, each with the TokenLogprob of the tokens that begin in it: (text, [TokenLogprob])."""
        yield self.text.prime, []
        while True:
            piece = self._pieces.get()
            if piece is _DONE:
                return
            if isinstance(piece, BaseException):
                raise piece
            yield piece

    def close(self):
        self.cancelled = True

    @property
    def stopped(self):
        """Whether a stop string ended the text (before its n tokens, or in the last block)."""
        return self.text.stopped

    def _put(self, piece):
        details = self.text.take_details()
        if piece or details:
            self._pieces.put((piece, details))


class _Row:
    """A generation's place in the batch: the carry of its sampling loop between two blocks."""

    def __init__(self, generation, previous, logits, states, counts):
        self.generation, self.previous, self.logits, self.states = generation, previous, logits, states
        self.counts = counts  # of each token generated so far, for the penalties
        self.position = 0


def block_steps(remaining):
    """The steps of the next block, for rows that still need `remaining` tokens: until the first of them is done,
    so that its place goes to a waiting request at once (at least MIN_BLOCK_STEPS), at most GENERATE_BLOCK, and
    none after the last is done."""
    return min(GENERATE_BLOCK, max(remaining), max(MIN_BLOCK_STEPS, min(remaining)))


def bucket(rows, max_batch):
    """The row count a batch of `rows` is padded to: the next power of two, at most max_batch."""
    return min(1 << (rows - 1).bit_length(), max_batch)


class Batcher:
    """The batching thread over one Sampler. At most max_batch requests generate at once and max_waiting more
    wait for a row; beyond them submit() raises Busy. A batch starts when the first request arrives and waits up to
    max_wait_s for others to join its first block (not after a batch that only ever had one row: a lone client's
    next request starts at once); later arrivals join at the next block."""

    def __init__(self, sampler, max_batch, max_wait_s, max_waiting):
        self.sampler, self.max_batch, self.max_wait_s, self.max_waiting = sampler, max_batch, max_wait_s, max_waiting
        self.generator = sampler.generator
        self._pending = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        # Requests submitted and not finished, at most max_batch + max_waiting; changed under _lock only, so that
        # taking a place is one step (BatcherPool sends a request to the least loaded).
        self.load = 0
        # Read by the metrics at each scrape; written by the batching thread only.
        self.rows = 0  # rows generating now
        self.on_block = None  # called with (rows, tokens made) after each block
        # Whether the last batch (from idle to idle) only ever had one row: its client was alone, and the next
        # request starts at once instead of waiting max_wait_s for others (at 1 client, 2 ms of every ~9).
        self._lone = False
        self._most_rows = 0  # the most rows of the batch running now
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, settings, stops=()):
        """Queue a request (a SampleSettings, and stop strings that end its text, see Sampler.stream); raises
        ValueError for a bad setting, Busy when full, and GenerationStopped once close() was called."""
        generation = self.prepare(settings, stops)
        self.take_place()
        return self.start(generation)

    def prepare(self, settings, stops=()):
        """A Generation for the request, its settings checked (ValueError); it holds no place yet."""
        prime, ids, drawn = self.sampler.prepare(settings, stops)
        return Generation(SampleText(self.sampler, prime, stops, logprobs=drawn.logprobs), drawn, ids)

    def take_place(self):
        """Count a request in; raises Busy when every place is taken, GenerationStopped once closed."""
        with self._lock:
            if self._closed:
                raise GenerationStopped("the server is shutting down")
            if self.load >= self.max_batch + self.max_waiting:
                raise Busy(self.max_batch, self.max_waiting)
            self.load += 1

    def start(self, generation):
        """Feed the prime of a request that took its place and queue it for the batch; returns the generation."""
        try:
            # The prime's pass runs here, on the caller's thread, beside the other callers' and the batch.
            generation.row = self._row(generation)
        except BaseException:
            self._release()
            raise
        with self._lock:  # with close(): once closed, nothing more is queued
            if not self._closed:
                self._pending.put(generation)
                return generation
        self._release()
        raise GenerationStopped("the server is shutting down")

    @property
    def waiting(self):
        """Requests submitted and not yet in the batch."""
        return self._pending.qsize()

    def close(self):
        """Refuse new requests and turn away the waiting ones (GenerationStopped); the thread ends once the
        generations in progress are done (or stopped, see Generator.stop)."""
        with self._lock:
            self._closed = True
            self._pending.put(None)

    # The batching thread

    def _loop(self):
        rows = []
        while True:
            try:
                rows = self._turn(rows)
            except Exception as error:  # noqa: BLE001 - whatever went wrong, no request may wait forever
                for row in rows:
                    self._finish(row.generation, error)
                rows = []
                self.rows = 0
            if rows is None:
                return

    def _turn(self, rows):
        """One turn of the loop: take the arrivals, drop the rows that left, run a block. Returns the rows
        still generating, or None when the thread should end."""
        arrivals = self._take(wait=not rows)
        if self._closed:  # shutting down: the requests not yet started are turned away
            for generation in arrivals + self._take(wait=False):
                self._finish(generation, GenerationStopped("the server is shutting down"))
            arrivals = []
            if not rows:
                return None
        for generation in arrivals:
            row = self._start(generation)
            if row is not None:
                rows.append(row)
        rows = [row for row in rows if not self._dropped(row)]
        if rows and self.generator.stopped.numpy():
            for row in rows:
                self._finish(row.generation, GenerationStopped(
                    f"the generation was stopped after {row.generation.made} of {row.generation.settings.n} "
                    f"tokens"))
            rows = []
        self.rows = len(rows)
        if rows:
            self._most_rows = max(self._most_rows, len(rows))
            self._block(rows)
            rows = [row for row in rows if not self._done(row)]
            if not rows:  # the batch is over
                self._lone, self._most_rows = self._most_rows == 1, 0
        self.rows = len(rows)
        return rows

    def _take(self, wait):
        """The requests that arrived, up to the free rows; with wait (nothing generating), block for the first and
        give others max_wait_s to join it, unless the last batch had a lone client. close() wakes a thread that
        waits."""
        arrivals, free = [], self.max_batch - self.rows
        deadline = None
        while len(arrivals) < free and not self._closed:
            try:
                if wait and not arrivals:
                    generation = self._pending.get()
                    deadline = time.monotonic() + (0 if self._lone else self.max_wait_s)
                elif deadline is not None:
                    generation = self._pending.get(timeout=max(deadline - time.monotonic(), 0))
                else:
                    generation = self._pending.get_nowait()
            except queue.Empty:
                break
            if generation is not None:  # None: close() woke the thread
                arrivals.append(generation)
        if self._closed:  # everything queued, whatever the free rows
            with contextlib.suppress(queue.Empty):
                while True:
                    generation = self._pending.get_nowait()
                    if generation is not None:
                        arrivals.append(generation)
        return arrivals

    def _row(self, generation):
        """A new request's place in the batch, its prime fed."""
        previous, logits, states = self.generator.feed_prime(generation.ids)
        return _Row(generation, previous, logits, np.concatenate([state[0] for state in states]),
                    np.zeros(len(logits), np.int32))

    def _start(self, generation):
        """A new request's row, or None when it needs no block (cancelled, or n = 0)."""
        if generation.cancelled or generation.settings.n == 0:
            self._finish(generation)
            return None
        return generation.row

    def _dropped(self, row):
        if row.generation.cancelled:
            self._finish(row.generation)
            return True
        return False

    def _block(self, rows):
        """One compiled block over the rows (padded with copies of the first up to the bucket size)."""
        padded = rows + [rows[0]] * (bucket(len(rows), self.max_batch) - len(rows))
        steps = block_steps([row.generation.settings.n - row.position for row in rows])
        scored = any(row.generation.settings.logprobs for row in rows)  # the plain block is quicker
        tokens, previous, logits, states, counts, scores = self.generator.batch_block(
            steps, np.array([row.position for row in padded], np.int32),
            np.array([row.previous for row in padded], np.int32),
            np.stack([row.logits for row in padded]), np.stack([row.states for row in padded]),
            np.stack([row.counts for row in padded]), row_settings([row.generation.settings for row in padded]),
            scored)
        made = 0
        for i, row in enumerate(rows):
            generation = row.generation
            ids = tokens[i, :min(generation.settings.n - row.position, steps)]
            row.previous, row.logits, row.states, row.counts = int(previous[i]), logits[i], states[i], counts[i]
            row.position += steps
            generation.made += len(ids)
            made += len(ids)
            generation._put(generation.text.add(ids, None if scores is None else scores.row(i, len(ids))))
        if self.on_block is not None:
            self.on_block(len(rows), made)

    def _done(self, row):
        if row.position >= row.generation.settings.n or row.generation.text.stopped:
            self._finish(row.generation)
            return True
        return False

    def _finish(self, generation, error=None):
        """Frees the generation's place, then gives its last piece and its end (or the error it ends with). Once
        only."""
        if generation.finished:
            return
        generation.finished = True
        self._release()  # first: a client that sends its next request as soon as it has its answer finds room
        if error is None:
            generation._put(generation.text.rest())
        generation._pieces.put(_DONE if error is None else error)

    def _release(self):
        with self._lock:
            self.load -= 1


def default_batchers(max_batch, cores):
    """The batching threads for max_batch rows on `cores` cores: one per core, each with MIN_ROWS_PER_BATCHER rows
    or more (at least one thread)."""
    return max(1, min(cores, max_batch // MIN_ROWS_PER_BATCHER))


def split(total, parts):
    """`total` in `parts` whole shares as even as can be, largest first: split(33, 2) == [17, 16]."""
    return [total // parts + (i < total % parts) for i in range(parts)]


class BatcherPool:
    """`count` Batchers over one Sampler, max_batch rows and max_waiting waiting places split between them; a
    request goes to the least loaded. The same interface as a Batcher (submit, close, rows, waiting); on_block is
    called from every batching thread."""

    def __init__(self, sampler, max_batch, max_wait_s, max_waiting, count, on_block=None):
        if not 1 <= count <= max_batch:
            raise ValueError(f"the batching threads must be from 1 to max_batch ({max_batch}), got {count}")
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.batchers = [Batcher(sampler, rows, max_wait_s, waiting)
                         for rows, waiting in zip(split(max_batch, count), split(max_waiting, count))]
        for batcher in self.batchers:
            batcher.on_block = on_block
        self._choosing = threading.Lock()

    def submit(self, settings, stops=()):
        """Batcher.submit on the batcher with the most free places (Busy names the pool's totals)."""
        generation = self.batchers[0].prepare(settings, stops)  # a bad setting is refused before taking a place
        # The choice and the place taken in one step: two requests that read the same loads at once would both go
        # to the same batcher, and the later one get Busy while another batcher had room. Loads only fall
        # meanwhile, so when the chosen batcher is full, every batcher is.
        with self._choosing:
            batcher = max(self.batchers, key=lambda batcher: batcher.max_batch + batcher.max_waiting - batcher.load)
            try:
                batcher.take_place()
            except Busy:
                raise Busy(self.max_batch, self.max_waiting) from None
        return batcher.start(generation)

    @property
    def rows(self):
        return sum(batcher.rows for batcher in self.batchers)

    @property
    def waiting(self):
        return sum(batcher.waiting for batcher in self.batchers)

    def close(self):
        for batcher in self.batchers:
            batcher.close()


class OneAtATime:
    """--max_batch 0: each request generates alone, on its own CherryPy worker thread, at most `running` at once;
    `waiting` more wait for a turn. Any further request, and every waiting one once close() was called, is
    refused at once (Busy, GenerationStopped) instead of piling up. submit() as Batcher.submit."""

    def __init__(self, sampler, running, waiting):
        self.sampler, self.running, self.places = sampler, running, waiting
        self.admitted = threading.BoundedSemaphore(running + waiting)
        self.generating = threading.BoundedSemaphore(running)
        self.closed = threading.Event()
        self.rows = 0  # requests generating now (for the metrics)
        self.on_done = None  # called with the tokens a request made, at its end
        self.admitted_count = 0
        self._lock = threading.Lock()

    @property
    def waiting(self):
        return self.admitted_count - self.rows

    def submit(self, settings, stops=()):
        self.sampler.prepare(settings, stops)  # a bad setting is refused before taking a place
        if self.closed.is_set():
            raise GenerationStopped("the server is shutting down")
        if not self.admitted.acquire(blocking=False):
            raise Busy(self.running, self.places, "--threads, --queue")
        self._count("admitted_count", 1)
        return AloneGeneration(self, settings, stops)

    def close(self):
        self.closed.set()

    def _count(self, name, change):
        with self._lock:
            setattr(self, name, getattr(self, name) + change)


class AloneGeneration:
    """A request of OneAtATime: iterating it waits for a turn, then yields sample.py's pieces of its text (pieces():
    each with its TokenLogprob, as Generation.pieces); stopped says, once it is iterated, whether a stop string
    ended the text."""

    def __init__(self, slots, settings, stops=()):
        self.slots, self.settings, self.stops = slots, settings, stops
        self.stopped = False
        self._left = False

    def __iter__(self):
        for piece, _ in self.pieces():
            yield piece

    def pieces(self):
        slots = self.slots
        try:
            while not slots.generating.acquire(timeout=SLOT_POLL_S):
                if slots.closed.is_set():
                    raise GenerationStopped("the server is shutting down")
            slots._count("rows", 1)
            try:
                text = yield from slots.sampler.pieces(self.settings, self.stops)
                self.stopped = text.stopped
                if slots.on_done is not None:
                    slots.on_done(self.settings.n)
            finally:
                slots._count("rows", -1)
                slots.generating.release()
        finally:
            self.close()

    def close(self):
        """Give back the request's place (once)."""
        if not self._left:
            self._left = True
            self.slots._count("admitted_count", -1)
            self.slots.admitted.release()
