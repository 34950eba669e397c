"""The project's promise under faults, as a user meets them: bad or empty text, read-only and full disks,
permissions, line endings, NaN, interrupts. In every case the message is one line, nothing the user had is lost,
and nothing random or half-written is left behind to be sampled later."""
import contextlib
import json
import os
import random
import stat
import subprocess
import tracemalloc

import numpy as np
import pytest

import savedir
import train
import utils
from conftest import TINY_MODEL, TINY_TEXT, make_data_dir, run_script
from sampler import Sampler


def train_flags(data_dir, save_dir, *extra):
    """train.py flags for the tiny model, quiet, repeatable."""
    return ["--data_dir", data_dir, "--save_dir", save_dir, *TINY_MODEL, "--seed", "1", "--print_every", "1000",
            *map(str, extra)]


def error_line(capsys):
    """The one line a refused run printed on stderr (asserting it is one line, and no traceback)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@contextlib.contextmanager
def read_only(path):
    """Make a directory read-only for this process, root included (a read-only bind mount when root)."""
    path = str(path)
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    subprocess.run(["mount", "--bind", path, path], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", path], check=True)
        yield
    finally:
        subprocess.run(["umount", path], check=True)


# ----------------------------------------------------------------------------------------------------------
# Text that cannot be trained on


@pytest.mark.parametrize("text, says", [
    ("", "is empty"),
    (" \n\n  \t\n", "holds only whitespace"),
])
def test_empty_or_blank_text_is_refused_naming_the_file_before_a_save_dir_exists(tmp_path, capsys, text, says):
    data = make_data_dir(tmp_path / "data", text)
    save = tmp_path / "save"
    for extra in ([], ["--val_frac", "0"], ["--word_level"]):
        assert train.main(train_flags(data, str(save), *extra)) == 2
        line = error_line(capsys)
        assert os.path.join(data, "input.txt") in line and says in line
        assert not save.exists()


def test_a_word_text_of_one_distinct_word_is_refused(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data", "buffalo " * 2000)
    assert train.main(train_flags(data, str(tmp_path / "save"), "--word_level")) == 2
    assert "single distinct word ('buffalo')" in error_line(capsys)
    assert not (tmp_path / "save").exists()


# ----------------------------------------------------------------------------------------------------------
# Where the preprocessing cache goes


def test_a_read_only_data_dir_caches_in_the_user_cache_dir(tmp_path, monkeypatch):
    data = make_data_dir(tmp_path / "shared-corpus")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with read_only(data):
        first = utils.TextLoader(data, 4, 10)
        again = utils.TextLoader(data, 4, 10)  # found in the user cache, not rebuilt
    assert os.listdir(data) == ["input.txt"]
    cached = os.listdir(tmp_path / "xdg" / utils.USER_CACHE_NAME)
    assert len([name for name in cached if name.endswith(".ids.npy")]) == 1
    np.testing.assert_array_equal(first.ids, again.ids)
    assert first.vocab == again.vocab


def test_cache_dir_flag_puts_the_cache_there(tmp_path):
    data = make_data_dir(tmp_path / "data")
    assert train.main(train_flags(data, str(tmp_path / "save"), "--max_steps", 2,
                                  "--cache_dir", tmp_path / "cache")) == 0
    assert os.listdir(data) == ["input.txt"]
    assert any(name.endswith(".ids.npy") for name in os.listdir(tmp_path / "cache"))


def test_nowhere_to_write_the_cache_is_one_line_naming_the_cache(tmp_path, monkeypatch, capsys):
    data = make_data_dir(tmp_path / "data")
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    with read_only(data):
        assert train.main(train_flags(data, str(tmp_path / "save"))) == 1
    line = error_line(capsys)
    assert "cannot write the preprocessing cache" in line and "--cache_dir" in line and "cache-" in line
    assert ".tmp-" not in line
    assert not (tmp_path / "save").exists()


# ----------------------------------------------------------------------------------------------------------
# Permissions


def test_written_files_follow_the_umask_like_the_checkpoints(tmp_path):
    data = make_data_dir(tmp_path / "data")
    save = tmp_path / "save"
    old_mask = os.umask(0o022)
    try:
        assert train.main(train_flags(data, str(save), "--max_steps", 3)) == 0
    finally:
        os.umask(old_mask)
    files = [save / savedir.CONFIG_FILE, save / savedir.VOCAB_FILE, save / savedir.BEST_DIR / savedir.MODEL_INFO_FILE,
             save / savedir.BEST_DIR / savedir.CONFIG_FILE, *save.glob("model.ckpt-*"),
             *(tmp_path / "data").glob("cache-*")]
    modes = {str(path.relative_to(tmp_path)): oct(stat.S_IMODE(path.stat().st_mode)) for path in files}
    assert set(modes.values()) == {"0o644"}, modes


# ----------------------------------------------------------------------------------------------------------
# Line endings: CRLF is read as LF (one documented policy), unless --keep_crlf


def test_crlf_text_trains_without_carriage_returns_and_keep_crlf_keeps_them(tmp_path):
    crlf = make_data_dir(tmp_path / "crlf", TINY_TEXT.replace("\n", "\r\n"))
    lf = make_data_dir(tmp_path / "lf", TINY_TEXT)
    normalised, plain = utils.TextLoader(crlf, 4, 10), utils.TextLoader(lf, 4, 10)
    assert "\r" not in normalised.vocab and normalised.vocab == plain.vocab
    np.testing.assert_array_equal(normalised.ids, plain.ids)
    kept = utils.TextLoader(crlf, 4, 10, keep_crlf=True)
    assert "\r" in kept.vocab and len(kept.ids) == len(plain.ids) + TINY_TEXT.count("\n")


@pytest.mark.parametrize("chunk_bytes", [1, 2, 5])
def test_crlf_split_across_read_chunks_is_still_one_line_break(tmp_path, monkeypatch, chunk_bytes):
    path = tmp_path / "input.txt"
    path.write_bytes(b"ab\r\ncd\r\r\n\re\r")
    monkeypatch.setattr(utils, "READ_CHUNK_BYTES", chunk_bytes)
    assert "".join(utils.read_text_chunks(str(path))) == "ab\ncd\r\n\re\r"  # only CR LF pairs change


def test_a_model_trained_on_lf_takes_crlf_primes_and_texts(trained_save_dir, tmp_path):
    sampler = Sampler.load(trained_save_dir)
    assert sampler.sample("the cat\r\nthe ", 50, seed=3) == sampler.sample("the cat\nthe ", 50, seed=3)
    crlf_text = tmp_path / "crlf.txt"
    crlf_text.write_bytes(TINY_TEXT[:300].replace("\n", "\r\n").encode())
    lf_text = tmp_path / "lf.txt"
    lf_text.write_bytes(TINY_TEXT[:300].encode())
    results = [run_script("evaluate.py", "--save_dir", trained_save_dir, "--text", path, "--json")
               for path in (crlf_text, lf_text)]
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    crlf, lf = (json.loads(r.stdout) for r in results)
    assert (crlf["tokens"], crlf["loss_nats"]) == (lf["tokens"], lf["loss_nats"])


# ----------------------------------------------------------------------------------------------------------
# Memory of word-level preprocessing


def random_words(path, count, seed=0):
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(count)]
    common = ["the", "and", "of", "to", "a"] * (count // 5)
    words += common
    rng.shuffle(words)
    path.write_text("\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)) + "\n")


def peak_memory(function, *args):
    """function(*args)'s results, followed by the peak of the memory Python allocated while it ran."""
    tracemalloc.start()
    try:
        return (*function(*args), tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


def test_a_capped_word_vocabulary_is_the_exact_one_counted_in_bounded_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "READ_CHUNK_BYTES", 1 << 14)  # a text of many chunks, as a large corpus is
    path = tmp_path / "input.txt"
    random_words(path, 60_000)
    plain = utils.Tokenization(word_level=True)
    capped = utils.Tokenization(word_level=True, max_vocab=50)
    capped_counts, capped_total, dropped, bounded = peak_memory(utils._count_tokens, str(path), capped, str(tmp_path))
    counts, total, _, unbounded = peak_memory(utils._count_tokens, str(path), plain, str(tmp_path))
    assert capped_total == total and dropped
    assert utils.build_vocab(capped_counts, 50, 1, dropped) == utils.build_vocab(counts, 50)
    assert bounded < unbounded / 3, (bounded, unbounded)
    assert os.listdir(tmp_path) == ["input.txt"]  # the partition files are gone
