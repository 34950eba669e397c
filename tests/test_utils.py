"""utils.py: reading and tokenizing input.txt, the preprocessing cache, batches, and the default corpus download."""
import contextlib
import functools
import hashlib
import http.server
import os
import socket
import threading

import numpy as np
import pytest

import download
import utils
from conftest import TINY_TEXT, make_data_dir

ODD_TEXT = "a\u0085b\u2028c\x00d\U0001F600e \ufeff f\n"  # NEL, LINE SEPARATOR, NUL, an emoji, a mid-text U+FEFF


def load(data_dir, **kwargs):
    """A TextLoader with small batches (most corpora here are tiny)."""
    kwargs = {"batch_size": 2, "seq_length": 5, **kwargs}
    return utils.TextLoader(data_dir, **kwargs)


def decode(loader, ids):
    return "".join(loader.vocab[i] for i in ids)


def write_bytes(directory, data):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, download.INPUT_FILE), "wb") as f:
        f.write(data)
    return str(directory)


# ----------------------------------------------------------------------------------------------------------
# The cache


def test_editing_input_rebuilds_the_cache(tmp_path):
    data = make_data_dir(tmp_path / "data", "abcabcabc\n" * 20)
    before = load(data)
    assert sorted(before.vocab) == ["\n", "a", "b", "c"]
    # Same length and same size on disk: a cache keyed by size or time would be reused here.
    edited = "xbcabcabc\n" + "abcabcabc\n" * 19
    make_data_dir(tmp_path / "data", edited)
    after = load(data)
    assert "x" in after.vocab
    assert decode(after, after.ids) == edited


def test_reordering_the_text_gives_new_ids(tmp_path):
    data = make_data_dir(tmp_path / "data", "ab\n" * 30 + "ba\n" * 30)
    first = load(data)
    make_data_dir(tmp_path / "data", "ba\n" * 30 + "ab\n" * 30)
    second = load(data)
    assert decode(second, second.ids) == "ba\n" * 30 + "ab\n" * 30
    assert not np.array_equal(first.ids, second.ids)


def test_switching_word_level_uses_another_cache(tmp_path):
    data = make_data_dir(tmp_path / "data")
    chars = load(data)
    words = load(data, word_level=True)
    assert "cat" in words.vocab and "\n" in words.vocab
    assert len(words.ids) == len(utils.split_words(TINY_TEXT))
    # And back: the character cache is still the character one.
    again = load(data)
    assert again.vocab == chars.vocab
    assert decode(again, again.ids) == TINY_TEXT


def test_damaged_cache_is_rebuilt(tmp_path):
    data = make_data_dir(tmp_path / "data")
    load(data)
    for name in os.listdir(data):
        if name.startswith(utils.CACHE_PREFIX) and name.endswith(".json"):
            with open(os.path.join(data, name), "w") as f:
                f.write("{not json")
    loader = load(data)
    assert decode(loader, loader.ids) == TINY_TEXT


def test_word_level_keeps_line_breaks_and_caps_the_vocabulary(tmp_path):
    data = make_data_dir(tmp_path / "data", "the cat sat\nthe dog  sat\n\nthe end\n" * 5)
    loader = load(data, word_level=True, max_vocab=3)
    assert loader.vocab == ["\n", "the", "sat", utils.UNK_TOKEN]  # by falling count, then the unknown word
    assert loader.unk_token == utils.UNK_TOKEN
    text = utils.join_tokens([loader.vocab[i] for i in loader.ids[:10]], word_level=True)
    assert text == "the <unk> sat\nthe <unk> sat\n\nthe"


def cache_files(data_dir, suffix=".ids.npy"):
    return sorted(name for name in os.listdir(data_dir)
                  if name.startswith(utils.CACHE_PREFIX) and name.endswith(suffix))


def test_encoding_max_vocab_and_min_count_each_get_their_own_cache(tmp_path):
    text = "caf\u00e9 au lait, caf\u00e9 cr\u00e8me\n" * 10
    data = write_bytes(tmp_path / "data", text.encode("utf-8"))
    plain = load(data)
    assert decode(plain, plain.ids) == text and plain.unk_token is None
    # The same bytes read as latin-1: each two-byte character is two characters.
    latin = load(data, encoding="latin-1")
    assert decode(latin, latin.ids) == text.encode("utf-8").decode("latin-1")
    capped = load(data, max_vocab=3)
    assert len(capped.vocab) == 4 and capped.unk_token == utils.UNK_TOKEN
    counted = load(data, min_count=20)  # the characters seen fewer than 20 times become <unk>
    frequent = sorted((c for c in set(text) if text.count(c) >= 20), key=lambda c: (-text.count(c), c))
    assert counted.vocab == frequent + [utils.UNK_TOKEN]
    assert len(cache_files(data)) == len(cache_files(data, ".vocab.json")) == 4
    # Each setting reads its own cache back, whatever ran in between.
    for loader, kwargs in ((plain, {}), (latin, {"encoding": "latin-1"}), (capped, {"max_vocab": 3}),
                           (counted, {"min_count": 20})):
        again = load(data, **kwargs)
        assert again.vocab == loader.vocab and np.array_equal(again.ids, loader.ids)
    assert len(cache_files(data)) == 4


@pytest.mark.parametrize("word_level", [False, True])
def test_min_count_makes_exactly_the_rarer_tokens_unk(tmp_path, word_level):
    # Counts: the (a) 4 times, cat (b and the space) 3 times, dog (c) 2 times, bird (d) and the line break once.
    text = "the cat the dog the cat the cat dog bird\n" if word_level else "aaaa bbb cc d\n"
    tokens = utils.tokenize(text, word_level)
    counts = {token: tokens.count(token) for token in tokens}
    assert {2, 3} <= set(counts.values())  # tokens seen exactly min_count times and one time fewer
    for min_count in (2, 3):
        loader = load(make_data_dir(tmp_path / f"data{min_count}", text), word_level=word_level, val_frac=0,
                      batch_size=1, min_count=min_count)
        kept = sorted((token for token in counts if counts[token] >= min_count), key=lambda t: (-counts[t], t))
        assert loader.vocab == kept + [utils.UNK_TOKEN] and loader.unk_token == utils.UNK_TOKEN
        assert [loader.vocab[i] for i in loader.ids] == [t if counts[t] >= min_count else utils.UNK_TOKEN
                                                         for t in tokens]
    # min_count 1 (the default) keeps every token: no <unk>.
    loader = load(make_data_dir(tmp_path / "data1", text), word_level=word_level, val_frac=0, batch_size=1)
    assert sorted(loader.vocab) == sorted(counts) and loader.unk_token is None


@pytest.mark.parametrize("word_level", [False, True])
def test_max_vocab_keeps_exactly_that_many_of_the_most_frequent_tokens(tmp_path, word_level):
    text = "the cat the dog the cat the cat dog bird\n" if word_level else "aaaa bbb cc d\n"
    tokens = utils.tokenize(text, word_level)
    by_count = sorted(set(tokens), key=lambda t: (-tokens.count(t), t))
    data = make_data_dir(tmp_path / "data", text)
    for cap in (len(by_count) + 1, len(by_count)):  # a cap that drops nothing adds no <unk>
        loader = load(data, word_level=word_level, val_frac=0, batch_size=1, max_vocab=cap)
        assert loader.vocab == by_count and loader.unk_token is None
    for cap in (1, 2, len(by_count) - 1):
        loader = load(data, word_level=word_level, val_frac=0, batch_size=1, max_vocab=cap)
        assert loader.vocab == by_count[:cap] + [utils.UNK_TOKEN]
        assert [loader.vocab[i] for i in loader.ids] == [t if t in by_count[:cap] else utils.UNK_TOKEN
                                                         for t in tokens]


@pytest.mark.parametrize("max_vocab, vocab", [
    (0, ["apple", "mango", "zebra", "\n", "kiwi"]),
    (4, ["apple", "mango", "zebra", "\n", utils.UNK_TOKEN]),
    (2, ["apple", "mango", utils.UNK_TOKEN]),  # the cap falls among three words seen twice: ties go by the word
])
def test_tokens_seen_as_often_are_ordered_by_token_not_by_first_appearance(tmp_path, max_vocab, vocab):
    text = "zebra mango apple zebra mango apple kiwi\n"
    loader = load(make_data_dir(tmp_path / "data", text), word_level=True, val_frac=0, batch_size=1,
                  max_vocab=max_vocab)
    assert loader.vocab == vocab


def test_ids_are_16_bit_up_to_65536_tokens_and_32_bit_above():
    assert utils.id_dtype(1) == utils.id_dtype(65_536) == np.uint16
    assert utils.id_dtype(65_537) == utils.id_dtype(2 ** 20) == np.uint32


@pytest.mark.parametrize("num_words, dtype", [(65_536, np.uint16), (65_537, np.uint32)])
def test_the_cache_stores_ids_in_the_smallest_type_that_holds_them(tmp_path, num_words, dtype):
    words = [f"w{i}" for i in range(num_words)]
    data = make_data_dir(tmp_path / "data", " ".join(words))
    loader = load(data, word_level=True, val_frac=0)
    assert loader.vocab_size == num_words
    (ids_file,) = cache_files(data)
    stored = np.load(os.path.join(data, ids_file))
    assert stored.dtype == dtype and loader.ids.dtype == dtype
    assert len(stored) == num_words and stored.max() == num_words - 1
    assert [loader.vocab[i] for i in loader.ids] == words  # the highest ids round-trip
    assert os.path.getsize(os.path.join(data, ids_file)) < num_words * np.dtype(dtype).itemsize + 200


# ----------------------------------------------------------------------------------------------------------
# Code points and encodings


def test_odd_code_points_are_tokens_and_a_leading_bom_is_not(tmp_path):
    data = write_bytes(tmp_path / "data", (utils.BOM + ODD_TEXT * 10).encode("utf-8"))
    loader = load(data)
    for char in ("\u0085", "\u2028", "\x00", "\U0001F600", "\ufeff"):
        assert char in loader.vocab, repr(char)
    assert decode(loader, loader.ids) == ODD_TEXT * 10  # the leading BOM is gone, the mid-text U+FEFF kept
    assert len(loader.ids) == len(ODD_TEXT) * 10


def test_vocab_json_round_trips_every_code_point(tmp_path):
    import savedir
    data = write_bytes(tmp_path / "data", (utils.BOM + ODD_TEXT * 10).encode("utf-8"))
    loader = load(data)
    save = tmp_path / "save"
    save.mkdir()
    savedir.write_vocab(str(save), loader.vocab, loader.unk_token)
    tokens, unk = savedir.read_vocab(str(save))
    assert tokens == loader.vocab and unk is None
    assert "".join(tokens[i] for i in loader.ids) == ODD_TEXT * 10


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7])
def test_small_read_chunks_give_the_same_tokens(tmp_path, monkeypatch, chunk_bytes):
    # Multi-byte characters and words straddle the chunk boundaries here.
    text = ODD_TEXT * 4 + "héllo wörld\n" * 3
    data = write_bytes(tmp_path / "data", (utils.BOM + text).encode("utf-8"))
    monkeypatch.setattr(utils, "READ_CHUNK_BYTES", chunk_bytes)
    chars = load(data)
    assert decode(chars, chars.ids) == text
    words = load(data, word_level=True, val_frac=0)
    assert [words.vocab[i] for i in words.ids] == utils.split_words(text)


@pytest.mark.parametrize("chunk_bytes", [utils.READ_CHUNK_BYTES, 4])
@pytest.mark.parametrize("data, offset", [
    (b"hello \xff world\n" * 3, 6),
    ("caf\u00e9 ".encode() * 5 + b"\xc3(" + b" more text\n", 30),
    (b"abc\n" * 5 + b"\xf0\x9f\x98", 20),  # an emoji cut off at the end of the file
])
def test_invalid_utf8_is_refused_with_its_byte_offset(tmp_path, monkeypatch, chunk_bytes, data, offset):
    monkeypatch.setattr(utils, "READ_CHUNK_BYTES", chunk_bytes)
    directory = write_bytes(tmp_path / "data", data)
    with pytest.raises(ValueError, match=rf"byte offset {offset}\b.*--encoding"):
        load(directory)
    assert not [name for name in os.listdir(directory) if name != download.INPUT_FILE]  # no cache left behind


def test_latin1_encoding_reads_what_utf8_refuses(tmp_path):
    text = "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n" * 10
    directory = write_bytes(tmp_path / "data", text.encode("latin-1"))
    with pytest.raises(ValueError, match="byte offset 3"):
        load(directory)
    loader = load(directory, encoding="latin-1")
    assert "\u00e9" in loader.vocab
    assert decode(loader, loader.ids) == text


def test_unknown_encoding_is_refused(tmp_path):
    directory = make_data_dir(tmp_path / "data")
    with pytest.raises(ValueError, match="unknown encoding 'utf-99'"):
        load(directory, encoding="utf-99")


# ----------------------------------------------------------------------------------------------------------
# Batches


def test_batches_are_parallel_streams_with_next_token_targets(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(205))
    loader = load(make_data_dir(tmp_path / "data", text), batch_size=4, seq_length=5, val_frac=0.05)
    assert len(loader.val_ids) == 10 and decode(loader, loader.val_ids) == text[-10:]
    assert loader.num_batches == (195 - 1) // 20
    stream_length = loader.num_batches * 5
    for index in range(loader.num_batches):
        inputs, targets = loader.batch(index)
        assert inputs.shape == targets.shape == (4, 5)
        for row in range(4):
            start = row * stream_length + index * 5
            assert decode(loader, inputs[row]) == text[start:start + 5]
            assert decode(loader, targets[row]) == text[start + 1:start + 6]


def test_too_little_data_names_the_sizes_to_lower(tmp_path):
    directory = make_data_dir(tmp_path / "data", "just a few words\n")
    with pytest.raises(ValueError, match="too few for one batch of batch_size 50 x seq_length 50; "
                                         "lower --batch_size and/or --seq_length"):
        utils.TextLoader(directory, 50, 50, val_frac=0)


def test_too_small_validation_split_is_refused(tmp_path):
    directory = make_data_dir(tmp_path / "data", "a short text of forty characters, or so\n")
    with pytest.raises(ValueError, match="raise --val_frac"):
        load(directory, val_frac=0.01)


@pytest.mark.parametrize("num_train", [40, 41, 42, 59, 60, 61])
def test_the_number_of_batches_leaves_one_token_for_the_last_target(tmp_path, num_train):
    # 4 streams x 5 steps = 20 tokens a batch, and every input needs the next token as its target.
    text = "".join(chr(ord("a") + i % 26) for i in range(num_train))
    loader = load(make_data_dir(tmp_path / "data", text), batch_size=4, seq_length=5, val_frac=0)
    assert loader.num_batches == (num_train - 1) // 20
    usable = loader.num_batches * 20
    inputs = np.concatenate([loader.batch(i)[0] for i in range(loader.num_batches)], axis=1)
    targets = np.concatenate([loader.batch(i)[1] for i in range(loader.num_batches)], axis=1)
    assert decode(loader, inputs.ravel()) == text[:usable]
    assert decode(loader, targets.ravel()) == text[1:usable + 1]  # shifted by one, no wrap-around


def test_targets_never_reach_into_the_validation_tail(tmp_path):
    # 41 training tokens (2 batches of 4 x 5 and the last target) then 20 validation tokens of other characters
    # (enough for a third batch, were they counted).
    train_text = "".join(chr(ord("a") + i % 26) for i in range(41))
    text = train_text + "XYZ" * 6 + "XY"
    loader = load(make_data_dir(tmp_path / "data", text), batch_size=4, seq_length=5, val_frac=0.33)
    assert decode(loader, loader.train_ids) == train_text and decode(loader, loader.val_ids) == text[41:]
    assert loader.num_batches == 2
    last_targets = decode(loader, loader.batch(1)[1][-1])
    assert last_targets == train_text[-5:]


@pytest.mark.parametrize("length, val_frac, num_val", [(199, 0.05, 9), (200, 0.05, 10), (201, 0.05, 10),
                                                       (239, 0.05, 11), (100, 0.1, 10), (139, 0.1, 13)])
def test_validation_is_exactly_the_int_val_frac_tail(tmp_path, length, val_frac, num_val):
    text = "".join(chr(ord("a") + i % 26) for i in range(length))
    loader = load(make_data_dir(tmp_path / "data", text), val_frac=val_frac)
    assert int(length * val_frac) == num_val
    assert decode(loader, loader.val_ids) == text[length - num_val:]
    assert decode(loader, loader.train_ids) == text[:length - num_val]


def test_val_frac_zero_trains_on_every_token(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(41))
    loader = load(make_data_dir(tmp_path / "data", text), batch_size=4, seq_length=5, val_frac=0)
    assert len(loader.val_ids) == 0 and decode(loader, loader.train_ids) == text
    assert loader.num_batches == 2


def test_a_text_that_holds_a_batch_but_not_also_the_validation_tail_trains_on_all_of_it(tmp_path, capsys):
    # 22 tokens: less the tail of 2 (--val_frac 0.1), 20 are left, one short of a 4 x 5 batch and its last target.
    text = "".join(chr(ord("a") + i % 26) for i in range(22))
    loader = load(make_data_dir(tmp_path / "data", text), batch_size=4, seq_length=5, val_frac=0.1)
    assert len(loader.val_ids) == 0 and decode(loader, loader.train_ids) == text
    assert loader.num_batches == 1 and decode(loader, loader.batch(0)[1].ravel()) == text[1:21]
    assert capsys.readouterr().err.splitlines() == [
        "note: 22 tokens hold a batch of 4x5 but not also the validation tail of 2 (--val_frac 0.1): "
        "training without validation"]
    # Two tokens fewer hold no batch even without the tail: refused, as before.
    with pytest.raises(ValueError, match="too few for one batch of batch_size 4 x seq_length 5"):
        load(make_data_dir(tmp_path / "shorter", text[:20]), batch_size=4, seq_length=5, val_frac=0.1)


@pytest.mark.parametrize("chunk_bytes", [1, 2, 5, utils.READ_CHUNK_BYTES])
def test_words_survive_any_chunking_and_the_last_word_needs_no_line_break(tmp_path, monkeypatch, chunk_bytes):
    # Tabs, runs of spaces, carriage returns and other Unicode spaces only separate; the text ends mid-word.
    text = "one\ttwo  three\r\nfour\u00a0five\u3000six\n\nseven\x0beight  ninety-nine"
    monkeypatch.setattr(utils, "READ_CHUNK_BYTES", chunk_bytes)
    loader = load(make_data_dir(tmp_path / "data", text), word_level=True, val_frac=0, batch_size=1)
    words = [loader.vocab[i] for i in loader.ids]
    assert words == ["one", "two", "three", "\n", "four", "five", "six", "\n", "\n", "seven", "eight",
                     "ninety-nine"]


# ----------------------------------------------------------------------------------------------------------
# The default corpus


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class ShortBodyHandler(QuietHandler):
    """Promises more bytes than it sends, like a connection dropped mid-download."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"only the first bytes")


@contextlib.contextmanager
def http_server(directory, handler=QuietHandler):
    """Serve `directory` on 127.0.0.1 from a thread; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=directory))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served_corpus(tmp_path, monkeypatch):
    """A small file served over HTTP and accepted as the default corpus; yields (url, its bytes)."""
    content = TINY_TEXT.encode()
    served = tmp_path / "served"
    served.mkdir()
    (served / "corpus.txt").write_bytes(content)
    monkeypatch.setattr(download, "TINYSHAKESPEARE_SHA256", hashlib.sha256(content).hexdigest())
    monkeypatch.delenv(download.DATA_URL_ENV, raising=False)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # the default data dir, data/tinyshakespeare, is relative
    with http_server(str(served)) as base:
        yield f"{base}/corpus.txt", content


def closed_port_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/input.txt"


def default_dir_entries():
    return os.listdir(download.DEFAULT_DATA_DIR) if os.path.isdir(download.DEFAULT_DATA_DIR) else []


def test_download_with_the_right_checksum_is_written(served_corpus):
    url, content = served_corpus
    path = download.ensure_input(download.DEFAULT_DATA_DIR, data_url=url)
    assert path == os.path.join(download.DEFAULT_DATA_DIR, download.INPUT_FILE)
    with open(path, "rb") as f:
        assert f.read() == content
    assert default_dir_entries() == [download.INPUT_FILE]  # no temporary file left beside it
    loader = utils.TextLoader(download.DEFAULT_DATA_DIR, 4, 10)  # and it is what training reads
    assert decode(loader, loader.ids) == TINY_TEXT


def test_download_from_the_mirror_environment_variable(served_corpus, monkeypatch):
    url, content = served_corpus
    monkeypatch.setenv(download.DATA_URL_ENV, url)
    with open(download.ensure_input(download.DEFAULT_DATA_DIR), "rb") as f:
        assert f.read() == content


def test_download_from_a_local_mirror_path(served_corpus, tmp_path):
    _, content = served_corpus
    with open(download.ensure_input(download.DEFAULT_DATA_DIR, data_url=str(tmp_path / "served" / "corpus.txt")),
              "rb") as f:
        assert f.read() == content


def test_download_with_a_wrong_checksum_writes_nothing(served_corpus, monkeypatch):
    url, content = served_corpus
    monkeypatch.setattr(download, "TINYSHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(ValueError, match=f"SHA-256 {hashlib.sha256(content).hexdigest()}, expected 0000"):
        download.ensure_input(download.DEFAULT_DATA_DIR, data_url=url)
    assert default_dir_entries() == []


def test_download_cut_short_writes_nothing(tmp_path, served_corpus):
    with http_server(str(tmp_path), ShortBodyHandler) as base:
        with pytest.raises((ValueError, FileNotFoundError), match="put tinyshakespeare's input.txt at"):
            download.ensure_input(download.DEFAULT_DATA_DIR, data_url=f"{base}/input.txt")
    assert default_dir_entries() == []


def test_offline_says_where_to_put_the_file(served_corpus):
    target = os.path.join("data", "tinyshakespeare", "input.txt")
    with pytest.raises(FileNotFoundError, match=f"put tinyshakespeare's input.txt at {target}"):
        download.ensure_input(download.DEFAULT_DATA_DIR, data_url=closed_port_url())
    assert default_dir_entries() == []


def test_other_data_dir_without_input_is_an_error_and_downloads_nothing(served_corpus, monkeypatch):
    url, _ = served_corpus
    monkeypatch.setenv(download.DATA_URL_ENV, url)
    with pytest.raises(FileNotFoundError, match=r"mydata/input\.txt not found: put your text in input\.txt"):
        download.ensure_input("mydata")
    assert not os.path.exists("mydata") and default_dir_entries() == []
