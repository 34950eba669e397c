"""The states after the primes a sampler fed last, kept by prime (no TensorFlow: the states are numpy arrays)."""
import collections
import threading


class PrimeStates:
    """The states after the most recently used primes (at most `size`), by prime: a server's clients often send
    the same prime, and its state is the same state each time. Safe between threads. A plain object, so that
    TensorFlow does not track it as part of the Generator (and an export does not save it)."""

    def __init__(self, size):
        self.size, self._kept, self._lock = size, collections.OrderedDict(), threading.Lock()

    def get(self, key):
        """What put() kept for key, or None."""
        with self._lock:
            fed = self._kept.get(key)
            if fed is not None:
                self._kept.move_to_end(key)
            return fed

    def clear(self):
        """Forget every kept state (the model's weights changed)."""
        with self._lock:
            self._kept.clear()

    def put(self, key, fed):
        with self._lock:
            self._kept[key] = fed
            self._kept.move_to_end(key)
            if len(self._kept) > self.size:
                self._kept.popitem(last=False)
