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
    with open(os.path.join(directory, utils.INPUT_FILE), "wb") as f:
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
    assert not [name for name in os.listdir(directory) if name != utils.INPUT_FILE]  # no cache left behind


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
    monkeypatch.setattr(utils, "TINYSHAKESPEARE_SHA256", hashlib.sha256(content).hexdigest())
    monkeypatch.delenv(utils.DATA_URL_ENV, raising=False)
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
    return os.listdir(utils.DEFAULT_DATA_DIR) if os.path.isdir(utils.DEFAULT_DATA_DIR) else []


def test_download_with_the_right_checksum_is_written(served_corpus):
    url, content = served_corpus
    path = utils.ensure_input(utils.DEFAULT_DATA_DIR, data_url=url)
    assert path == os.path.join(utils.DEFAULT_DATA_DIR, utils.INPUT_FILE)
    with open(path, "rb") as f:
        assert f.read() == content
    assert default_dir_entries() == [utils.INPUT_FILE]  # no temporary file left beside it
    loader = utils.TextLoader(utils.DEFAULT_DATA_DIR, 4, 10)  # and it is what training reads
    assert decode(loader, loader.ids) == TINY_TEXT


def test_download_from_the_mirror_environment_variable(served_corpus, monkeypatch):
    url, content = served_corpus
    monkeypatch.setenv(utils.DATA_URL_ENV, url)
    with open(utils.ensure_input(utils.DEFAULT_DATA_DIR), "rb") as f:
        assert f.read() == content


def test_download_from_a_local_mirror_path(served_corpus, tmp_path):
    _, content = served_corpus
    with open(utils.ensure_input(utils.DEFAULT_DATA_DIR, data_url=str(tmp_path / "served" / "corpus.txt")),
              "rb") as f:
        assert f.read() == content


def test_download_with_a_wrong_checksum_writes_nothing(served_corpus, monkeypatch):
    url, content = served_corpus
    monkeypatch.setattr(utils, "TINYSHAKESPEARE_SHA256", "0" * 64)
    with pytest.raises(ValueError, match=f"SHA-256 {hashlib.sha256(content).hexdigest()}, expected 0000"):
        utils.ensure_input(utils.DEFAULT_DATA_DIR, data_url=url)
    assert default_dir_entries() == []


def test_download_cut_short_writes_nothing(tmp_path, served_corpus):
    with http_server(str(tmp_path), ShortBodyHandler) as base:
        with pytest.raises((ValueError, FileNotFoundError), match="put tinyshakespeare's input.txt at"):
            utils.ensure_input(utils.DEFAULT_DATA_DIR, data_url=f"{base}/input.txt")
    assert default_dir_entries() == []


def test_offline_says_where_to_put_the_file(served_corpus):
    target = os.path.join("data", "tinyshakespeare", "input.txt")
    with pytest.raises(FileNotFoundError, match=f"put tinyshakespeare's input.txt at {target}"):
        utils.ensure_input(utils.DEFAULT_DATA_DIR, data_url=closed_port_url())
    assert default_dir_entries() == []


def test_other_data_dir_without_input_is_an_error_and_downloads_nothing(served_corpus, monkeypatch):
    url, _ = served_corpus
    monkeypatch.setenv(utils.DATA_URL_ENV, url)
    with pytest.raises(FileNotFoundError, match=r"mydata/input\.txt not found: put your text in input\.txt"):
        utils.ensure_input("mydata")
    assert not os.path.exists("mydata") and default_dir_entries() == []
