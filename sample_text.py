"""The text of one sample as its ids arrive block by block: the tokens joined to the prime as the original joined
them, held back where a stop string may begin, and cut right before the first stop string (no TensorFlow)."""
from utils import join_tokens


class SampleText:
    """The generated text of one sample, block of ids by block: joined to the prime as Sampler.join joins, and cut
    right before the first stop string. add() returns the text that is final; rest() what was held back."""

    def __init__(self, sampler, prime, stops=()):
        self.sampler, self.prime, self.stops = sampler, prime, stops
        self.held_back = max(map(len, stops), default=1) - 1  # a stop string may begin in the last characters
        self.pending, self.last, self.made, self.stopped = "", None, 0, False

    def add(self, ids):
        tokens = [self.sampler.vocab[i] for i in ids]
        if self.last is None:  # the first block: joined to the prime as join() does
            self.pending += self.sampler.join(self.prime, tokens)[len(self.prime):]
        else:  # join_tokens' separator before the block depends on the token before it
            self.pending += join_tokens([self.last, *tokens], self.sampler.word_level)[len(self.last):]
        self.last, self.made = tokens[-1], self.made + len(tokens)
        found = [index for index in (self.pending.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.stopped = True
            final, self.pending = self.pending[:min(found)], ""
            return final
        cut = max(len(self.pending) - self.held_back, 0)
        final, self.pending = self.pending[:cut], self.pending[cut:]
        return final

    def rest(self):
        rest, self.pending = self.pending, ""
        return rest
