"""Pretrained word vectors -> the initial embedding matrix (train.py --word2vec_embedding).

embedding_matrix(path, vocab, seed) loads vectors with gensim 4 and returns one row per token of the
vocabulary, set by token: row i is the vector of vocab[i]. Tokens the vectors lack get random rows of the same
scale. The embedding width is the vectors' size, whatever rnn_size is.

Accepted files, recognised by their content:
    word2vec text format      first line "COUNT SIZE", then "word v1 ... vSIZE" per line (.txt, .vec)
    word2vec binary format    first line "COUNT SIZE", then each word, a space and SIZE float32 values (.bin)
    text without that header  GloVe's format: "word v1 ... vSIZE" per line
    gensim 4 saves            Word2Vec.save / KeyedVectors.save (and their subclasses, e.g. FastText)
Any of them may be compressed (.gz or .bz2). gensim's saves are Python pickles, and loading a pickle can run
code hidden in the file: give only files you trust, and prefer the word2vec formats
(`model.wv.save_word2vec_format(path, binary=True)` exports a gensim model to one).

gensim is imported only here and only when called: it takes seconds to import.
"""
import contextlib
import importlib
import io
import logging
import os
import pickletools

import numpy as np

HEAD_BYTES = 1 << 16  # enough of the file to recognise its format and read its first vector
SCALE_ROWS = 100_000  # the scale of random rows is measured on at most this many vectors
FALLBACK_SCALE = 0.05  # Keras' default embedding scale, when the vectors have no spread at all
PICKLE_PROTO = 0x80  # first byte of a pickle of protocol 2 or later (gensim writes protocol 4)
TEXT_OPCODES = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE")
FRAMING_OPCODES = ("PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT")
SAVE_AS_WORD2VEC = "model.wv.save_word2vec_format(PATH, binary=True)"


def embedding_matrix(path, vocab, seed=None):
    """Rows for `vocab` (tokens in id order) from the vectors in `path`: float32 [len(vocab), vector size].

    Prints how many tokens have no vector. Raises FileNotFoundError or ValueError (one line, saying what to
    do) when the file is missing, unreadable, or shares no token with the vocabulary.
    """
    vectors = load_vectors(path)
    matrix, missing = rows_by_token(vectors.key_to_index, vectors.vectors, vocab, seed)
    if missing == len(vocab):
        sample = ", ".join(repr(key) for key in vectors.index_to_key[:5])
        raise ValueError(f"none of the {len(vocab)} tokens of this text has a vector in {path} (its keys look "
                         f"like {sample}): give vectors keyed by the same tokens (words with --word_level, "
                         f"characters without)")
    print(f"{path}: {matrix.shape[1]}-dimensional vectors; "
          f"{missing} of {len(vocab)} tokens have no vector; they start random")
    return matrix


def rows_by_token(key_to_index, vectors, vocab, seed=None):
    """Build the matrix: row i = vectors[key_to_index[vocab[i]]], or a random normal row of the vectors'
    standard deviation (seeded by `seed`) for a token without one. Returns (float32 matrix, missing count).
    """
    vectors = np.asarray(vectors)
    scale = float(np.std(vectors[:SCALE_ROWS], dtype=np.float64)) if vectors.size else 0.0
    if not np.isfinite(scale) or scale == 0.0:
        scale = FALLBACK_SCALE
    rng = np.random.default_rng(seed)
    matrix = rng.normal(0.0, scale, size=(len(vocab), vectors.shape[1])).astype(np.float32)
    found = [(row, key_to_index[token]) for row, token in enumerate(vocab) if token in key_to_index]
    if found:
        rows, sources = map(list, zip(*found))
        matrix[rows] = vectors[sources]
    if not np.all(np.isfinite(matrix)):
        raise ValueError("the word vectors hold NaN or infinite values: the file is damaged")
    return matrix, len(vocab) - len(found)


def load_vectors(path):
    """Load the vectors of a word2vec text/binary file or a gensim 4 save; returns gensim KeyedVectors."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"word vectors {path} not found: give --word2vec_embedding the path of a word2vec "
                                f".txt/.bin file or of a model saved by gensim 4")
    if os.path.isdir(path):
        raise FileNotFoundError(f"word vectors {path} is a directory: give the vector file inside it")
    from gensim import utils as gensim_utils
    try:
        with gensim_utils.open(path, "rb") as f:  # decompresses .gz and .bz2 as gensim itself does
            head = f.read(HEAD_BYTES)
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read the word vectors {path} ({one_line(e)}): is it damaged?")
    if not head:
        raise ValueError(f"the word vectors file {path} is empty")
    if head[0] == PICKLE_PROTO:
        return _load_gensim_save(path, head)
    return _load_word2vec_format(path, head)


# ----------------------------------------------------------------------------------------------------------
# word2vec formats


def _load_word2vec_format(path, head):
    """Recognise the text, binary or header-less text format from the head of the file, then load it."""
    from gensim.models import KeyedVectors
    first_line, _, rest = head.partition(b"\n")
    header = _header(first_line)
    if header is not None:
        options = {"binary": not _is_text_vector(rest, header[1])}
    elif _is_text_vector(first_line, len(first_line.split()) - 1):
        options = {"binary": False, "no_header": True}
    else:
        raise ValueError(f"{path} is not word vectors: neither the word2vec text or binary format (first line "
                         f"'COUNT SIZE') nor a model saved by gensim 4; convert it with {SAVE_AS_WORD2VEC}")
    try:
        return KeyedVectors.load_word2vec_format(path, **options)
    except Exception as e:  # gensim reports a damaged file with many kinds of errors; all mean the same here
        kind = "binary" if options["binary"] else "text"
        raise ValueError(f"{path} looks like the word2vec {kind} format but cannot be read ({one_line(e)}): "
                         f"is it complete?")


def _header(line):
    """(count, size) from a word2vec header line, or None when the line is not one."""
    fields = line.split()
    if len(fields) != 2 or not all(field.isdigit() for field in fields):
        return None
    count, size = map(int, fields)
    return (count, size) if count > 0 and size > 0 else None


def _is_text_vector(data, size):
    """True when `data` starts with a text line "word v1 ... v<size>" (so the file is not binary)."""
    line = data.split(b"\n", 1)[0]
    try:
        fields = line.decode("utf-8").split()
        values = [float(field) for field in fields[1:]]
    except ValueError:  # not UTF-8 (UnicodeDecodeError is a ValueError) or not numbers
        return False
    return size > 0 and len(values) == size


# ----------------------------------------------------------------------------------------------------------
# gensim's own saves (pickles)


def _load_gensim_save(path, head):
    """Load a Word2Vec/KeyedVectors save after checking, without unpickling, that it holds one."""
    from gensim.models import KeyedVectors, Word2Vec
    found = pickled_class(head)
    if found is None:
        raise ValueError(f"{path} is a Python pickle but not a gensim model; give a word2vec text/binary file")
    module, name = found
    if module.partition(".")[0] != "gensim":
        raise ValueError(f"{path} is a pickled {module}.{name}, not a gensim model; "
                         f"give a word2vec text/binary file")
    cls = _gensim_class(module, name)
    if cls is None:
        raise ValueError(f"{path} holds a {module}.{name}, which gensim 4 no longer has: it was saved by an "
                         f"older gensim; load it there and export it with {SAVE_AS_WORD2VEC}")
    if not (isinstance(cls, type) and issubclass(cls, (KeyedVectors, Word2Vec))):
        raise ValueError(f"{path} holds a gensim {name}, not word vectors: give a Word2Vec or KeyedVectors save")
    try:
        with _quiet_gensim():  # gensim logs its own multi-line advice; the error below says it in one line
            loaded = cls.load(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} needs {e.filename}, which gensim saved beside it: keep the files "
                                f"together")
    except Exception as e:  # unpickling old or foreign objects fails in many ways; all mean the same here
        raise ValueError(f"cannot load {path} with gensim 4 ({one_line(e)}): it is damaged or was saved by an "
                         f"older gensim; load it there and export it with {SAVE_AS_WORD2VEC}")
    return loaded.wv if isinstance(loaded, Word2Vec) else loaded


def pickled_class(head):
    """(module, name) of the class of the object a pickle holds, read from its first bytes without unpickling;
    None when the pickle holds no class instance (a dict, a list...) or cannot be parsed."""
    strings = []
    with contextlib.suppress(Exception):  # a truncated or corrupt stream simply has no class to name
        for opcode, argument, _ in pickletools.genops(io.BytesIO(head)):
            if opcode.name in FRAMING_OPCODES:
                continue
            if opcode.name in TEXT_OPCODES:
                strings.append(argument)  # protocol 4 pushes the module and class name, then STACK_GLOBAL
                continue
            if opcode.name == "GLOBAL":  # protocols 2 and 3: "module name" in one argument
                module, _, name = argument.partition(" ")
                return module, name
            if opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                return strings[-2], strings[-1]
            return None
    return None


def _gensim_class(module, name):
    """The class `name` of the gensim module `module`, or None when this gensim lacks it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError, TypeError):  # names from a file may be anything
        return None


@contextlib.contextmanager
def _quiet_gensim():
    logger = logging.getLogger("gensim")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def one_line(error):
    """An exception as one short line: its type and its message, whitespace collapsed."""
    text = " ".join(str(error).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
