"""The text of one sample as its ids arrive block by block: the tokens joined to the prime as the original joined
them, held back where a stop string may begin, and cut right before the first stop string; with logprobs, each
token's TokenLogprob, given with the piece of text it begins in (no TensorFlow)."""
from token_logprobs import TokenLogprob
from utils import join_tokens


class SampleText:
    """The generated text of one sample, block of ids by block: joined to the prime as Sampler.join joins, and cut
    right before the first stop string. add() returns the text that is final; rest() what was held back.

    logprobs > 0: add() also takes the block's scores (sampler.BlockScores of this row) and take_details() returns
    the TokenLogprob of each token that begins in the text returned so far (the tokens cut by a stop string are
    never returned), each with that many alternatives."""

    def __init__(self, sampler, prime, stops=(), logprobs=0):
        self.sampler, self.prime, self.stops, self.logprobs = sampler, prime, stops, logprobs
        self.held_back = max(map(len, stops), default=1) - 1  # a stop string may begin in the last characters
        self.pending, self.last, self.made, self.stopped = "", None, 0, False
        self.given = self.length = len(prime)  # where the text returned, and the text added, end (prime included)
        self.details = []  # the TokenLogprob of the tokens added and not yet taken

    def add(self, ids, scores=None):
        tokens = [self.sampler.vocab[i] for i in ids]
        if self.logprobs:
            self._score(tokens, scores)
        if self.last is None:  # the first block: joined to the prime as join() does
            added = self.sampler.join(self.prime, tokens)[len(self.prime):]
        else:  # join_tokens' separator before the block depends on the token before it
            added = join_tokens([self.last, *tokens], self.sampler.word_level)[len(self.last):]
        self.pending += added
        self.length += len(added)
        self.last, self.made = tokens[-1], self.made + len(tokens)
        found = [index for index in (self.pending.find(stop) for stop in self.stops) if index >= 0]
        if found:
            self.stopped = True
            final, self.pending = self.pending[:min(found)], ""
            return self._give(final)
        cut = max(len(self.pending) - self.held_back, 0)
        final, self.pending = self.pending[:cut], self.pending[cut:]
        return self._give(final)

    def rest(self):
        rest, self.pending = self.pending, ""
        return self._give(rest)

    def take_details(self):
        """The TokenLogprob of the tokens that begin in the text returned so far, not taken before."""
        taken = [detail for detail in self.details if detail.text_offset < self.given]
        self.details = [] if self.stopped else self.details[len(taken):]
        return taken

    def _give(self, final):
        self.given += len(final)
        return final

    def _score(self, tokens, scores):
        """Each token's TokenLogprob, where it begins found as add() joins it (one token at a time)."""
        # As Python numbers at once: a numpy scalar at a time costs several times more.
        token_logprobs, top_ids, top_logprobs = (score[:, :self.logprobs].tolist() if score.ndim == 2
                                                 else score.tolist() for score in scores)
        vocab, length, last, word_level = self.sampler.vocab, self.length, self.last, self.sampler.word_level
        for token, logprob, ids, logprobs in zip(tokens, token_logprobs, top_ids, top_logprobs):
            if last is None:
                added = self.sampler.join(self.prime, [token])[len(self.prime):]
            elif word_level:
                added = join_tokens([last, token], word_level)[len(last):]
            else:  # characters concatenate
                added = token
            length, last = length + len(added), token
            top = [(vocab[i], value) for i, value in zip(ids, logprobs)]
            self.details.append(TokenLogprob(token, logprob, top, length - len(token)))
