"""Text -> token ids -> batches.

TextLoader reads `data_dir/input.txt`, builds (or reuses) a cache of token ids keyed by the text's content hash
and the tokenization settings, and serves char-rnn batches: the training tokens are cut into `batch_size`
parallel streams and batch i is the next `seq_length` tokens of every stream. The last `val_frac` of the tokens
(a contiguous tail) is held out for validation.

The text is read in chunks and never held whole in memory: a 1 GB corpus needs about its token array
(2 bytes per token for vocabularies under 65,536 tokens), memory-mapped from the cache.
"""
import codecs
import collections
import dataclasses
import errno
import hashlib
import heapq
import json
import os
import re
import sys
import tempfile
import zlib

import numpy as np

from download import ensure_input
from files import atomic_write_bytes, new_temp_file

CACHE_PREFIX = "cache-"
CACHE_VERSION = 1  # bump when the cache layout or tokenization changes
READ_CHUNK_BYTES = 2 << 20  # text is decoded and tokenized this many bytes at a time (bounds the working set)
NUM_CODE_POINTS = 0x110000
BOM = "\ufeff"
NEWLINE = "\n"
CR, CRLF = "\r", "\r\n"
UNK_TOKEN = "<unk>"
WORD_PARTITIONS = 16  # a capped word vocabulary is counted one sixteenth of the distinct words at a time
USER_CACHE_NAME = "char-rnn"
_WORDS_AND_NEWLINES = re.compile(r"\n|[^\s]+")


class NoTextError(FileNotFoundError):
    """input.txt is there but holds no text (empty, or only whitespace): the text is missing as much as with no
    input.txt at all, so the scripts exit with the same code (1, as for a save dir without a checkpoint)."""


# ----------------------------------------------------------------------------------------------------------
# Tokenization


def split_words(text):
    """Split text into words (runs of non-space) and line breaks; other whitespace only separates."""
    return _WORDS_AND_NEWLINES.findall(text)


def join_tokens(tokens, word_level):
    """Turn tokens back into text: characters concatenate; words join with single spaces, lines kept."""
    if not word_level:
        return "".join(tokens)
    pieces = []
    for token in tokens:
        if token != NEWLINE and pieces and pieces[-1] != NEWLINE:
            pieces.append(" ")
        pieces.append(token)
    return "".join(pieces)


def tokenize(text, word_level):
    """Split text into tokens: code points, or words and line breaks at word level."""
    return split_words(text) if word_level else list(text)


def read_text_chunks(path, encoding="utf-8", keep_crlf=False):
    """Yield the decoded text of `path` in chunks; drop a leading byte-order mark and, unless `keep_crlf`, turn
    every CRLF line ending into LF.

    Invalid input raises ValueError naming the byte offset of the first bad byte.
    """
    chunks = _decoded_chunks(path, encoding)
    return chunks if keep_crlf else _crlf_to_lf(chunks)


def _decoded_chunks(path, encoding):
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}: give a Python codec name such as utf-8 or latin-1")
    offset, first = 0, True
    with open(path, "rb") as f:
        while True:
            raw = f.read(READ_CHUNK_BYTES)
            final = not raw
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                raise ValueError(f"{path} is not valid {encoding} at byte offset {bad}: "
                                 f"convert it to UTF-8 or give its --encoding")
            offset += len(raw)
            if first and text:
                text = text.removeprefix(BOM)
                first = False
            if text:
                yield text
            if final:
                return


def _crlf_to_lf(chunks):
    """Re-cut text chunks with CRLF turned into LF; a CR that ends a chunk waits for the next one's first character."""
    carry = ""
    for chunk in chunks:
        chunk = carry + chunk
        carry = CR if chunk.endswith(CR) else ""
        chunk = chunk[:len(chunk) - len(carry)].replace(CRLF, NEWLINE)
        if chunk:
            yield chunk
    if carry:
        yield carry


def normalize_newlines(text, keep_crlf=False):
    """A prime or a short text as training saw its input: CRLF as LF unless `keep_crlf`."""
    return text if keep_crlf else text.replace(CRLF, NEWLINE)


def _word_chunks(chunks):
    """Re-cut text chunks so that no word is split across two of them."""
    carry = ""
    for chunk in chunks:
        chunk = carry + chunk
        cut = max(chunk.rfind(" "), chunk.rfind(NEWLINE), chunk.rfind("\t"))
        carry = chunk[cut + 1:]
        if cut >= 0:
            yield chunk[:cut + 1]
    if carry:
        yield carry


@dataclasses.dataclass(frozen=True)
class Tokenization:
    """How a text becomes tokens and a vocabulary; every field is part of the cache's key."""
    encoding: str = "utf-8"
    word_level: bool = False
    max_vocab: int = 0
    min_count: int = 1
    keep_crlf: bool = False


def _chunk_tokens(path, tokenization):
    """Yield the tokens of the file one chunk at a time: a numpy code-point array, or a list of words."""
    chunks = read_text_chunks(path, tokenization.encoding, tokenization.keep_crlf)
    if tokenization.word_level:
        for chunk in _word_chunks(chunks):
            yield split_words(chunk)
    else:
        for chunk in chunks:
            yield np.frombuffer(chunk.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def build_vocab(counts, max_vocab=0, min_count=1, dropped=False):
    """Order tokens by falling count (ties by token) and apply the cap; returns (tokens, unk_token or None).

    With a cap (`max_vocab` > 0 or `min_count` > 1) that drops any token (or `dropped`: tokens were dropped before
    `counts` was made), UNK_TOKEN is added as the last id.
    """
    ordered = sorted(counts.items(), key=_frequency_order)
    kept = [token for token, count in ordered if count >= min_count]
    if max_vocab and len(kept) > max_vocab:
        kept = kept[:max_vocab]
    if len(kept) == len(ordered) and not dropped:
        return kept, None
    if UNK_TOKEN in kept:
        kept.remove(UNK_TOKEN)
    return kept + [UNK_TOKEN], UNK_TOKEN


def _frequency_order(item):
    token, count = item
    return -count, token


def _count_tokens(path, tokenization, work_dir):
    """Count the tokens of the file: (Counter of token -> count, total tokens, whether tokens were left out).

    A capped word vocabulary is counted in bounded memory (see _count_capped_words); otherwise every token is
    counted, since every one is in the vocabulary.
    """
    if tokenization.word_level and (tokenization.max_vocab or tokenization.min_count > 1):
        return _count_capped_words(path, tokenization, work_dir)
    if tokenization.word_level:
        counts = collections.Counter()
        for tokens in _chunk_tokens(path, tokenization):
            counts.update(tokens)
        return counts, sum(counts.values()), False
    point_counts = np.zeros(NUM_CODE_POINTS, dtype=np.int64)  # one counter per code point: 9 MB, O(n) counting
    for points in _chunk_tokens(path, tokenization):
        point_counts += np.bincount(points, minlength=NUM_CODE_POINTS)
    seen = np.flatnonzero(point_counts)
    counts = collections.Counter({chr(p): int(point_counts[p]) for p in seen})
    return counts, sum(counts.values()), False


def _count_capped_words(path, tokenization, work_dir):
    """Count words for a capped vocabulary without holding every distinct word at once.

    The words are spread over WORD_PARTITIONS files by hash, so each distinct word lands in one partition; each
    partition is counted alone and only the candidates for the vocabulary (at least min_count, at most
    max_vocab of the likeliest) are kept. Same vocabulary as counting everything; memory is about one partition.
    """
    total, newlines = 0, 0
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".tmp-words-") as parts:
        files = [open(os.path.join(parts, str(i)), "w", encoding="utf-8", errors="surrogatepass", newline=NEWLINE)
                 for i in range(WORD_PARTITIONS)]
        try:
            for tokens in _chunk_tokens(path, tokenization):
                total += len(tokens)
                for token in tokens:
                    if token == NEWLINE:
                        newlines += 1
                    else:  # words hold no whitespace: one per line
                        partition = zlib.crc32(token.encode("utf-8", "surrogatepass")) % WORD_PARTITIONS
                        files[partition].write(token + NEWLINE)
        finally:
            for f in files:
                f.close()
        kept, distinct = [(NEWLINE, newlines)] if newlines else [], 1 if newlines else 0
        for i in range(WORD_PARTITIONS):
            with open(os.path.join(parts, str(i)), encoding="utf-8", errors="surrogatepass", newline=NEWLINE) as f:
                counts = collections.Counter(line[:-1] for line in f)
            distinct += len(counts)
            candidates = [item for item in counts.items() if item[1] >= tokenization.min_count]
            kept = _likeliest(kept + candidates, tokenization.max_vocab)
    return collections.Counter(dict(kept)), total, len(kept) < distinct


def _likeliest(items, limit):
    """The `limit` likeliest (token, count) items in vocabulary order (all of them when limit is 0)."""
    return heapq.nsmallest(limit, items, key=_frequency_order) if limit else items


def _encode_file(path, tokenization, vocab, unk_token, out):
    """Append the ids of every token of the file to the open binary file `out`, one chunk at a time.

    Chunks are written straight to the file (not through a memory map) so that the written ids never
    count against the process's memory.
    """
    index = {token: i for i, token in enumerate(vocab)}
    unk_id = index.get(unk_token, -1)
    dtype = id_dtype(len(vocab))
    if not tokenization.word_level:
        # A table from code point to id (unknown code points to the unknown token): one lookup per chunk.
        table = np.full(NUM_CODE_POINTS, max(unk_id, 0), dtype=dtype)
        for token, i in index.items():
            if token != unk_token:
                table[ord(token)] = i
    for tokens in _chunk_tokens(path, tokenization):
        if tokenization.word_level:
            ids = np.fromiter((index.get(t, unk_id) for t in tokens), dtype=dtype, count=len(tokens))
        else:
            ids = table[tokens]
        out.write(ids.tobytes())


def id_dtype(vocab_size):
    """The smallest unsigned dtype that holds every token id."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


# ----------------------------------------------------------------------------------------------------------
# The cache


def file_sha256(path):
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(READ_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def user_cache_dir():
    """Where caches go when the data dir cannot be written: $XDG_CACHE_HOME/char-rnn, or ~/.cache/char-rnn."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, USER_CACHE_NAME)


def _writable(directory):
    """True when files can be created in `directory` (made if missing)."""
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def preprocess(input_path, cache_dir, encoding="utf-8", word_level=False, max_vocab=0, min_count=1,
               keep_crlf=False, fallback_dirs=()):
    """Tokenize `input_path` once and cache it; return (ids memmap, vocab list, unk_token or None).

    The cache name is the hash of the text and of every tokenization setting, so an edited input or other
    settings never reuse a stale cache. It is looked for in `cache_dir`, then in `fallback_dirs`, and written to
    the first of them that can be written.
    """
    tokenization = Tokenization(encoding, word_level, max_vocab, min_count, keep_crlf)
    settings = {"version": CACHE_VERSION, **dataclasses.asdict(tokenization)}
    key = hashlib.sha256((file_sha256(input_path) + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
    name = CACHE_PREFIX + key[:24]
    directories = [cache_dir, *fallback_dirs]
    for directory in directories:
        cached = _read_cache(os.path.join(directory, name))
        if cached:
            return cached
    writable = next((d for d in directories if _writable(d)), None)
    if writable is None:
        raise OSError(errno.EACCES, "cannot write the preprocessing cache in any of "
                      f"{', '.join(directories)}; give a writable --cache_dir", os.path.join(cache_dir, name))
    stem = os.path.join(writable, name)
    try:
        _write_cache(input_path, tokenization, stem, settings)
    except NoTextError:  # refused before anything was written, not a failed write
        raise
    except OSError as e:
        raise OSError(e.errno, f"cannot write the preprocessing cache ({e.strerror}); free some space or give "
                      f"another --cache_dir", stem + ".ids.npy") from None
    return _read_cache(stem)


def _read_cache(stem):
    """(ids memmap, vocab, unk_token) from the cache files at `stem`, or None when missing or damaged."""
    ids_path, vocab_path = stem + ".ids.npy", stem + ".vocab.json"
    if os.path.isfile(ids_path) and os.path.isfile(vocab_path):
        try:
            with open(vocab_path, encoding="utf-8") as f:
                meta = json.load(f)
            return np.load(ids_path, mmap_mode="r"), meta["vocab"], meta["unk_token"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt
    return None


def _write_cache(input_path, tokenization, stem, settings):
    """Count, build the vocabulary and write the ids (.ids.npy) and vocabulary (.vocab.json) at `stem`."""
    directory = os.path.dirname(stem)
    counts, total, dropped = _count_tokens(input_path, tokenization, directory)
    vocab, unk_token = build_vocab(counts, tokenization.max_vocab, tokenization.min_count, dropped)
    check_trainable(input_path, vocab, tokenization.word_level)  # before anything is written
    fd, tmp_ids = new_temp_file(directory, ".npy")
    try:
        with os.fdopen(fd, "wb") as out:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(id_dtype(len(vocab)))),
                      "fortran_order": False, "shape": (total,)}
            np.lib.format.write_array_header_1_0(out, header)
            _encode_file(input_path, tokenization, vocab, unk_token, out)
        os.replace(tmp_ids, stem + ".ids.npy")
    finally:
        if os.path.exists(tmp_ids):
            os.remove(tmp_ids)
    meta = {"vocab": vocab, "unk_token": unk_token, "settings": settings}
    atomic_write_bytes(stem + ".vocab.json", json.dumps(meta, ensure_ascii=True).encode("ascii"))


# ----------------------------------------------------------------------------------------------------------
# Batches


class TextLoader:
    """Token ids of one data dir, split into training streams and a validation tail.

    Attributes: vocab (tokens in id order), vocab_size, unk_token, train_ids, val_ids, num_batches.
    """

    def __init__(self, data_dir, batch_size, seq_length, val_frac=0.05, encoding="utf-8", word_level=False,
                 max_vocab=0, min_count=1, data_url=None, keep_crlf=False, cache_dir=None):
        input_path = ensure_input(data_dir, data_url)
        self.batch_size, self.seq_length, self.word_level = batch_size, seq_length, word_level
        if os.path.getsize(input_path) == 0:
            raise NoTextError(f"{input_path} is empty: put the text to train on in it")
        # The cache goes next to input.txt; a read-only data dir (a shared corpus) uses the user's cache dir.
        places = (cache_dir,) if cache_dir else (data_dir, user_cache_dir())
        self.ids, self.vocab, self.unk_token = preprocess(input_path, places[0], encoding, word_level, max_vocab,
                                                          min_count, keep_crlf, places[1:])
        self.vocab_size = len(self.vocab)
        check_trainable(input_path, self.vocab, word_level)  # a cache an older version wrote for such a text
        num_val = int(len(self.ids) * val_frac)
        if val_frac > 0 and num_val < 2:
            raise ValueError(f"the validation split of {len(self.ids)} tokens at --val_frac {val_frac} "
                             f"has {num_val} tokens; raise --val_frac (or give --val_frac 0)")
        if num_val and not batches_in(len(self.ids) - num_val, batch_size, seq_length) and batches_in(
                len(self.ids), batch_size, seq_length):
            # A text that holds one batch but not also the validation tail (the original's CI trains on 100 lines
            # with the default sizes): train on all of it rather than refuse, and say so.
            print(f"note: {len(self.ids):,} tokens hold a batch of {batch_size}x{seq_length} but not also the "
                  f"validation tail of {num_val:,} (--val_frac {val_frac}): training without validation",
                  file=sys.stderr)
            num_val = 0
        self.train_ids = self.ids[:len(self.ids) - num_val]
        self.val_ids = self.ids[len(self.ids) - num_val:]
        self.num_batches = batches_in(len(self.train_ids), batch_size, seq_length)
        if self.num_batches == 0:
            raise ValueError(
                f"{len(self.train_ids)} training tokens are too few for one batch of batch_size {batch_size} "
                f"x seq_length {seq_length}; lower --batch_size and/or --seq_length (or give more text)")
        usable = self.num_batches * batch_size * seq_length
        # One row per parallel stream; targets are the next token, with no wrap-around.
        self._x = self.train_ids[:usable].reshape(batch_size, -1)
        self._y = self.train_ids[1:usable + 1].reshape(batch_size, -1)

    @classmethod
    def from_config(cls, config):
        """The TextLoader of a settings.TrainConfig: its data dir and its data, tokenization and batch settings."""
        return cls(config.data_dir, config.batch_size, config.seq_length, config.val_frac, config.encoding,
                   config.word_level, config.max_vocab, config.min_count, config.data_url, config.keep_crlf,
                   config.cache_dir)

    def batch(self, index):
        """Return batch `index` of the epoch as two int32 arrays (inputs, targets) of [batch, seq_length]."""
        columns = slice(index * self.seq_length, (index + 1) * self.seq_length)
        return self._x[:, columns].astype(np.int32), self._y[:, columns].astype(np.int32)


def batches_in(num_tokens, batch_size, seq_length):
    """The batches of an epoch over `num_tokens` training tokens (each input token needs the next as its target)."""
    return (num_tokens - 1) // (batch_size * seq_length)


def check_trainable(input_path, vocab, word_level):
    """Refuse a text with nothing to learn: only whitespace (NoTextError), or a single distinct token (ValueError)."""
    if all(token.isspace() for token in vocab):
        raise NoTextError(f"{input_path} holds only whitespace: put the text to train on in it")
    if len(vocab) < 2:
        kind = "word" if word_level else "character"
        raise ValueError(f"{input_path} has a single distinct {kind} ({vocab[0]!r}): there is nothing to predict; "
                         f"give a longer text")


def encode_tokens(tokens, index, unk_token, word_level, what="the text"):
    """Map tokens to ids with `index`; unknown tokens become unk_token, or are refused by name (ValueError)."""
    unknown = [t for t in dict.fromkeys(tokens) if t not in index]
    if unknown and unk_token is None:
        shown = ", ".join(repr(t) for t in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        kind = "words" if word_level else "characters"
        raise ValueError(f"{what} has {kind} the model does not know: {shown}")
    unk_id = index.get(unk_token, -1)
    return [index.get(t, unk_id) for t in tokens]
