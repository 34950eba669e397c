"""Text in, text out around the compiled Generator: what sample.py and the sampling server share.

Sampler.load(save_dir) restores a save dir; sampler.sample(prime, n, mode, temperature, seed, top_k) checks
every argument, turns the prime into ids (refusing unknown tokens by name), runs the generator and returns the
prime followed by the generated text.
"""
import secrets

import numpy as np
import tensorflow as tf

import savedir
from cli import FLOAT32_MAX, FLOAT32_TINY, in_float32_range
from model import MODE_ARGMAX, MODE_SAMPLE, MODE_SAMPLE_ON_SPACES, Generator
from utils import NEWLINE, encode_tokens, join_tokens, normalize_newlines, tokenize

SAMPLE_MODES = (MODE_ARGMAX, MODE_SAMPLE, MODE_SAMPLE_ON_SPACES)
MAX_SEED = 2 ** 63 - 1
MAX_N = 2 ** 30  # the generator counts tokens in int32
# An empty prime starts the model from a line break (from token id 0, the most frequent token, when the
# vocabulary has no line break): text then begins as if at the start of a line.
EMPTY_PRIME_START = NEWLINE


class GenerationStopped(Exception):
    """generator.stop() was called (the server is shutting down) before the n tokens asked for were made."""


class Sampler:
    """A restored model and its vocabulary, ready to generate text; safe to share between threads."""

    def __init__(self, loaded):
        self.config, self.vocab, self.unk_token = loaded.config, loaded.vocab, loaded.unk_token
        self.word_level = bool(self.config["word_level"])
        self.index = {token: i for i, token in enumerate(self.vocab)}
        self.generator = Generator(loaded.model, space_id=self.index.get(" ", -1))
        self.start_id = self.index.get(EMPTY_PRIME_START, 0)
        self.keep_crlf = savedir.keeps_crlf(self.config, self.vocab)

    @classmethod
    def load(cls, save_dir, word_level_flag=False):
        """Restore save_dir (see savedir.load) and build its sampler.

        word_level_flag is the old --word_level flag: the level comes from the saved config, the flag only warns.
        """
        sampler = cls(savedir.load(save_dir))
        if word_level_flag and not sampler.word_level:
            savedir.warn("--word_level ignored: this model was trained at character level")
        return sampler

    def encode(self, prime):
        """Prime text -> token ids; unknown tokens map to the unknown-word token, or are refused by name."""
        prime = normalize_newlines(prime, self.keep_crlf)
        return encode_tokens(tokenize(prime, self.word_level), self.index, self.unk_token, self.word_level,
                             what="the prime")

    def sample(self, prime="", n=500, mode=MODE_SAMPLE, temperature=1.0, seed=None, top_k=0):
        """Return the prime followed by n generated tokens as text. Bad arguments raise ValueError; a stop of
        the generator (see Generator.stop) before the n tokens were made raises GenerationStopped."""
        check_arguments(n, mode, temperature, seed, top_k)
        prime = normalize_newlines(prime, self.keep_crlf)
        ids = self.encode(prime) or [self.start_id]
        if self.word_level and mode == MODE_SAMPLE_ON_SPACES:
            mode = MODE_SAMPLE  # every word follows a space, so "sample on spaces" samples at every step
        seed = secrets.randbelow(MAX_SEED) if seed is None else seed
        generated = self.generator.generate(tf.constant(ids, tf.int32), tf.constant(n, tf.int32),
                                            tf.constant(temperature, tf.float32), tf.constant(mode, tf.int32),
                                            tf.constant(seed, tf.int64), tf.constant(top_k, tf.int32))
        if generated.shape[0] < n:
            raise GenerationStopped(f"the generation was stopped after {generated.shape[0]} of {n} tokens")
        return self.join(prime, [self.vocab[i] for i in generated.numpy()])

    def join(self, prime, tokens):
        """The prime followed by generated tokens, as the original printed them."""
        text = join_tokens(tokens, self.word_level)
        if self.word_level and prime and text and not prime[-1].isspace() and text[0] != NEWLINE:
            return prime + " " + text  # words are joined by single spaces, line breaks stand alone
        return prime + text


def check_arguments(n, mode, temperature, seed, top_k):
    """Raise ValueError with a one-line reason when a sampling argument is out of range."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= MAX_N:
        raise ValueError(f"n must be an integer from 0 to {MAX_N}, got {n!r}")
    if mode not in SAMPLE_MODES:
        raise ValueError(f"sample mode must be 0 (argmax), 1 (sample) or 2 (sample on spaces), got {mode!r}")
    if not (isinstance(temperature, (int, float)) and in_float32_range(temperature)):
        raise ValueError(f"temperature must be a number from {FLOAT32_TINY:.2g} to {FLOAT32_MAX:.2g}, "
                         f"got {temperature!r}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if not 0 <= top_k <= MAX_N:  # top_k goes to the generator as int32, which would wrap larger values
        raise ValueError(f"top_k must be an integer from 0 to {MAX_N} (0 keeps every token), got {top_k!r}")
