"""The project's promise under faults, as a user meets them: bad or empty text, read-only and full disks,
permissions, line endings, kill -9 at random moments, damaged checkpoints, NaN, Ctrl-C at start-up and mid-epoch,
SIGTERM under load. In every case the message is one line, nothing the user had is lost,
and nothing random or half-written is left behind to be sampled later."""
import contextlib
import csv
import glob
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

import checkpoints
import download
import evaluate
import sample
import savedir
import train
import trainer
import utils
from conftest import (
    REPO,
    SPAWN_TIMEOUT_S,
    TINY_TEXT,
    assert_best_describes_its_weights,
    ctrl_c_not_ignored,
    error_line,
    make_data_dir,
    newest_step,
    run_script,
    snapshot,
    train_flags,
    wait_for,
)
from sampler import Sampler
from servers import free_port, get, running_server
from test_old_save_dir import EXPECTED as OLD_EXPECTED, OLD_SAVE_DIR


def models(files):
    """The part of a snapshot that holds models: checkpoints, their index, and best/."""
    return {name: digest for name, digest in files.items()
            if name.startswith((checkpoints.CHECKPOINT_NAME, savedir.BEST_DIR + os.sep)) or name == "checkpoint"}


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
def test_empty_or_blank_text_is_refused_as_a_missing_one_before_anything_is_written(tmp_path, capsys, text, says):
    save = tmp_path / "save"
    assert train.main(train_flags(str(tmp_path / "no-data"), str(save))) == 1  # no input.txt at all
    assert "input.txt not found" in error_line(capsys)
    data = make_data_dir(tmp_path / "data", text)
    for extra in ([], ["--val_frac", "0"], ["--word_level"]):
        assert train.main(train_flags(data, str(save), *extra)) == 1  # the same exit code: no text either way
        line = error_line(capsys)
        assert os.path.join(data, "input.txt") in line and says in line
        assert not save.exists()
        assert os.listdir(data) == ["input.txt"]  # no preprocessing cache left beside it


def test_a_word_text_of_one_distinct_word_is_refused(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data", "buffalo " * 2000)
    assert train.main(train_flags(data, str(tmp_path / "save"), "--word_level")) == 2
    assert "single distinct word ('buffalo')" in error_line(capsys)
    assert not (tmp_path / "save").exists()


# ----------------------------------------------------------------------------------------------------------
# A text that holds a batch but not also the validation tail: the original project's CI


ORIGINAL_CI_LINES = 100  # its data/teenytinyshakespeare: the first 100 lines of tinyshakespeare, 2,621 characters
NO_VALIDATION_NOTE = "but not also the validation tail of 131 (--val_frac 0.05): training without validation"


@pytest.mark.slow
def test_the_original_ci_trains_resumes_and_samples_on_the_first_100_lines(tmp_path):
    from conftest import REAL_CORPUS
    corpus = tmp_path / "tinyshakespeare.txt"
    download.download(REAL_CORPUS, str(corpus), download.TINYSHAKESPEARE_SHA256)
    with open(corpus, encoding="utf-8") as f:
        lines = [next(f) for _ in range(ORIGINAL_CI_LINES)]
    make_data_dir(tmp_path / "data" / "teenytinyshakespeare", "".join(lines))
    # Its three commands, verbatim, with every default (batch_size 50 x seq_length 50, num_epochs 50).
    trained = run_script("train.py", "--data_dir", "data/teenytinyshakespeare", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert trained.stderr.strip().splitlines() == [
        f"note: 2,621 tokens hold a batch of 50x50 {NO_VALIDATION_NOTE}"]
    assert "50/50 (epoch 49), train_loss = " in trained.stdout and "val_loss" not in trained.stdout
    resumed = run_script("train.py", "--data_dir", "data/teenytinyshakespeare", "--init_from", "save", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert NO_VALIDATION_NOTE in resumed.stderr and "resumed from save/model.ckpt-50" in resumed.stdout
    best = savedir.read_yaml(str(tmp_path / "save" / savedir.BEST_DIR / savedir.MODEL_INFO_FILE))
    assert best["score_is"] == "mean train_loss" and best["val_loss"] is None
    sampled = run_script("sample.py", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("The") and len(sampled.stdout) == len("The") + 500 + len("\n")


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


# ----------------------------------------------------------------------------------------------------------
# Kills, damaged checkpoints, Ctrl-C mid-epoch


KILL_SEED_ENV = "CHAR_RNN_KILL_SEED"  # replays the kill moments of a failed run of the SIGKILL test


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_resumable_save_dir(tmp_path, data_dir, capsys):
    seed = int(os.environ.get(KILL_SEED_ENV) or random.randrange(2 ** 32))
    replay = f"random seed {seed}: replay with {KILL_SEED_ENV}={seed}"
    print(replay)
    rng = random.Random(seed)
    delays = []  # the kill moments so far, in the failure message
    try:
        sigkill_at_random_moments(tmp_path, data_dir, capsys, rng, delays)
    except (Exception, pytest.fail.Exception) as e:
        raise AssertionError(f"{replay}; kills after {', '.join(f'{d:.3f}s' for d in delays)}: "
                             f"{e.__class__.__name__}: {e}") from e


def sigkill_at_random_moments(tmp_path, data_dir, capsys, rng, delays):
    """Start train.py, SIGKILL it after a delay drawn from rng, check the save dir and resume, four times."""
    save = str(tmp_path / "save")
    # A checkpoint (and often a new best/) every other step, so that kills land in the middle of saves.
    flags = train_flags(data_dir, save, "--save_every", 2, "--print_every", 1, "--num_epochs", 1000)
    for kill in range(4):
        log_path = tmp_path / f"run{kill}.log"
        resuming = kill > 0
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, os.path.join(REPO, "train.py"), *flags, *(["--init_from", save] if resuming else [])],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            if resuming:  # it restored the save dir the last kill left, and trains on
                wait_for(lambda: "resumed from" in log_path.read_text() and
                         " (epoch " in log_path.read_text().split("resumed from")[1], process, "training step")
            else:
                wait_for(lambda: checkpoints.has_checkpoint(save), process, "first checkpoint")
            delay = rng.uniform(0.0, 1.0)
            delays.append(delay)
            time.sleep(delay)
            process.send_signal(signal.SIGKILL)
            process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        context = f"kill {kill} after {delay:.3f}s; log:\n{log_path.read_text()[-2000:]}"
        try:
            assert_best_describes_its_weights(save, data_dir)
            # Continue in this process: it must resume and end cleanly when given more steps.
            target = max(checkpoints.checkpoint_step(p) for p in checkpoints.checkpoint_paths(save)) + 2
            assert train.main(flags + ["--init_from", save, "--max_steps", str(target)]) == 0
            assert newest_step(save) == target
            assert_best_describes_its_weights(save, data_dir)
        except AssertionError as e:
            raise AssertionError(f"{context}\n{e}") from e
        capsys.readouterr()


@pytest.mark.parametrize("suffix", [".data-00000-of-00001", ".index"])
def test_truncated_newest_checkpoint_falls_back_to_the_one_before(trained_copy, capsys, suffix):
    save, data = trained_copy
    newest, before = checkpoints.checkpoint_paths(save)[:2]
    with open(newest + suffix, "r+b") as f:
        f.truncate(os.path.getsize(newest + suffix) // 2)

    loaded = savedir.load(save)
    assert loaded.path == before
    err = capsys.readouterr().err
    assert f"warning: checkpoint {newest} is damaged" in err and "trying the one before it" in err

    target = checkpoints.checkpoint_step(newest) + 3
    assert train.main(train_flags(data, save, "--init_from", save, "--max_steps", target)) == 0
    captured = capsys.readouterr()
    assert f"warning: checkpoint {newest} is damaged" in captured.err
    assert f"resumed from {before}: step {checkpoints.checkpoint_step(before)}" in captured.out
    assert newest_step(save) == target


def test_the_next_run_removes_the_unfinished_checkpoint_of_a_killed_save_in_one_line(trained_copy, capsys):
    save, data = trained_copy
    newest = checkpoints.checkpoint_paths(save)[0]
    step = checkpoints.checkpoint_step(newest)
    # What a SIGKILL in the middle of TensorFlow's write of the next checkpoint leaves, for good until now.
    leftover = os.path.join(save, f"{checkpoints.CHECKPOINT_NAME}-{step + 1}_temp")
    os.makedirs(leftover)
    with open(os.path.join(leftover, "part-00000-of-00001.data-00000-of-00001.tempstate1234"), "wb") as f:
        f.write(b"\0" * 100)
    capsys.readouterr()
    assert train.main(train_flags(data, save, "--init_from", save, "--max_steps", step + 2)) == 0
    captured = capsys.readouterr()
    assert not os.path.exists(leftover)
    said = [line for line in captured.err.splitlines() if os.path.basename(leftover) in line]
    assert len(said) == 1 and said[0].startswith("removed ") and save in said[0], captured.err
    assert f"resumed from {newest}: step {step}" in captured.out
    assert newest_step(save) == step + 2


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_exits_130(tmp_path, data_dir):
    save = str(tmp_path / "save")
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log, ctrl_c_not_ignored():
        process = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "train.py"),
             *train_flags(data_dir, save, "--print_every", 1, "--num_epochs", 1000, "--save_every", 10 ** 6)],
            stdout=log, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        wait_for(lambda: "\n20/" in log_path.read_text(), process, "step 20")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=SPAWN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == trainer.EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    printed = [int(line.split("/")[0]) for line in log_path.read_text().splitlines() if " train_loss = " in line]
    saved = newest_step(save)  # save_every is out of reach: this checkpoint is the interrupt's
    assert saved >= printed[-1] >= 20
    assert f"interrupted: checkpoint written to {os.path.join(save, 'model.ckpt-' + str(saved))}" in err
    assert train.main(train_flags(data_dir, save, "--init_from", save, "--max_steps", saved + 1)) == 0


# ----------------------------------------------------------------------------------------------------------
# Divergence (NaN, or a loss far above a uniform guess's): never saved, never loaded

BLOWN_UP_LOGIT = 1e4  # the output bias of one token: every other token's loss is then about 1e4 nats, still finite


def losses_from(monkeypatch, change):
    """The divergence watch of the compiled step sees change(step, loss) instead of each step's training loss (the
    step counting from 1); the gradients and the mean training loss stay those of the real loss."""
    real_update = trainer.DivergenceWatch.update

    def update(watch, loss, step):
        return real_update(watch, change(step, loss), step)
    monkeypatch.setattr(trainer.DivergenceWatch, "update", update)


def blow_up_the_weights_from(monkeypatch, first_step):
    """From step `first_step` on, every training step ends with the output layer's bias of the rarest token at
    BLOWN_UP_LOGIT: the weights of a run whose learning rate is far too high, made alike on every processor (a
    real --learning_rate 1e30 makes the loss NaN on some and finite but astronomical on others)."""
    real_make_train_step = trainer.make_train_step

    def make_train_step(model, optimizer, progress, grad_clip, strategy=None, watch=None):
        step = real_make_train_step(model, optimizer, progress, grad_clip, strategy, watch)

        def train_step(inputs, targets):
            loss = step(inputs, targets)
            if int(progress.step) >= first_step:
                model.head.bias.assign(tf.one_hot(model.vocab_size - 1, model.vocab_size) * BLOWN_UP_LOGIT)
            return loss
        return train_step
    monkeypatch.setattr(trainer, "make_train_step", make_train_step)


def test_a_resume_whose_loss_blows_up_saves_nothing_and_keeps_the_last_good_checkpoint(trained_copy, monkeypatch,
                                                                                        capsys):
    save, data = trained_copy
    before = models(snapshot(save))
    newest = checkpoints.checkpoint_paths(save)[0]
    blow_up_the_weights_from(monkeypatch, first_step=1)
    code = train.main(train_flags(data, save, "--init_from", save, "--save_every", 1))
    assert code == 1
    line = error_line(capsys)
    assert "the validation loss became " in line and " nats (2 x the " in line  # finite, but far above ln V
    assert "training stopped" in line and f"the last good checkpoint, {newest}, is kept" in line
    assert models(snapshot(save)) == before  # no new checkpoint, best/ untouched
    assert checkpoints.weights_finite(savedir.load(save).model)


def test_a_mean_training_loss_far_above_a_uniform_guess_is_never_saved(tmp_path, data_dir, monkeypatch, capsys):
    """Without a validation split, the mean training loss since the last checkpoint is what tells."""
    blow_up_the_weights_from(monkeypatch, first_step=8)  # steps 9 and 10 have a loss of about 1e4
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--val_frac", 0, "--save_every", 5, "--max_steps", 20)) == 1
    line = error_line(capsys)
    assert "the training loss became " in line and "before step 10, above " in line and "model.ckpt-5, is kept" in line
    assert [checkpoints.checkpoint_step(path) for path in checkpoints.checkpoint_paths(save)] == [5]


@pytest.mark.parametrize("steps_above, code", [(trainer.DIVERGED_STEPS - 1, 0), (trainer.DIVERGED_STEPS, 1)])
def test_a_training_loss_far_above_a_uniform_guess_stops_once_it_lasts_diverged_steps(
        tmp_path, data_dir, monkeypatch, capsys, steps_above, code):
    """A spike of the loss shorter than DIVERGED_STEPS is not divergence; one that lasts that long stops the run
    before its first checkpoint."""
    spike = range(5, 5 + steps_above)
    losses_from(monkeypatch, lambda step, loss: tf.where(
        tf.logical_and(step >= spike[0], step <= spike[-1]), BLOWN_UP_LOGIT, loss))
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--max_steps", 40)) == code
    if code:
        line = error_line(capsys)
        assert f"for {steps_above} steps ({BLOWN_UP_LOGIT:g} at step {spike[-1]})" in line
        assert "no checkpoint was written" in line and not checkpoints.has_checkpoint(save)
    else:
        assert newest_step(save) == 40


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    # The step's loss as if the weights had blown up at step 25.
    losses_from(monkeypatch, lambda step, loss: tf.where(step >= 25, float("nan"), loss))
    save = str(tmp_path / "save")
    code = train.main(train_flags(data_dir, save, "--save_every", 20, "--max_steps", 60))
    assert code == 1
    line = error_line(capsys)
    assert "the training loss became nan at step 25" in line and "last good checkpoint" in line
    assert newest_step(save) == 20
    assert savedir.read_yaml(os.path.join(save, savedir.BEST_DIR, savedir.MODEL_INFO_FILE))["step"] == 20


def test_weights_that_became_nan_after_a_finite_loss_are_never_saved(tmp_path, data_dir, monkeypatch, capsys):
    """The loss of a step is computed before its update: an update that makes the weights NaN leaves that loss
    finite, and without a validation split nothing else would notice before the save."""
    real_make_train_step = trainer.make_train_step

    def poisons_the_weights_at_step_10(model, optimizer, progress, grad_clip, strategy=None, watch=None):
        step = real_make_train_step(model, optimizer, progress, grad_clip, strategy, watch)

        def train_step(inputs, targets):
            loss = step(inputs, targets)
            if int(progress.step) == 10:  # the last step before a save
                model.head.bias.assign(model.head.bias * np.nan)
            return loss
        return train_step
    monkeypatch.setattr(trainer, "make_train_step", poisons_the_weights_at_step_10)
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--val_frac", 0, "--save_every", 5, "--max_steps", 20)) == 1
    line = error_line(capsys)
    assert "the weights became NaN or infinite by step 10" in line and "model.ckpt-5, is kept" in line
    assert [checkpoints.checkpoint_step(path) for path in checkpoints.checkpoint_paths(save)] == [5]
    assert checkpoints.weights_finite(savedir.load(save).model)


def test_diverging_from_scratch_says_no_checkpoint_was_written(tmp_path, data_dir, monkeypatch, capsys):
    blow_up_the_weights_from(monkeypatch, first_step=1)
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--save_every", 1)) == 1
    assert "no checkpoint was written" in error_line(capsys)
    assert not checkpoints.has_checkpoint(save)


@pytest.mark.parametrize("value", ["1e39", "1e-46", "inf"])
def test_a_learning_rate_float32_cannot_hold_is_refused(tmp_path, data_dir, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_flags(data_dir, str(tmp_path / "save"), "--learning_rate", value))
    assert exit_info.value.code == 2
    assert f"argument --learning_rate: {value!r} is not a positive number" in capsys.readouterr().err
    assert not (tmp_path / "save").exists()


def poison_newest_checkpoint(save):
    """Write a newer checkpoint (weights, optimizer, counters: all a resume reads) whose weights hold a NaN, as a
    diverged run of an older version could."""
    config = savedir.read_config(save)
    model = savedir.build_model(config)
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    progress = trainer.Progress(model.num_states, config["batch_size"], config["rnn_size"], config["seq_length"])
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, progress=progress)
    newest = checkpoints.checkpoint_paths(save)[0]
    checkpoint.read(newest).assert_existing_objects_matched()
    model.head.kernel.assign(model.head.kernel * np.nan)
    progress.step.assign_add(1)
    return checkpoints.checkpoint_manager(checkpoint, save).save(checkpoint_number=int(progress.step))


def test_sample_evaluate_and_resume_refuse_nan_weights_in_one_line(trained_copy, capsys):
    save, data = trained_copy
    poisoned = poison_newest_checkpoint(save)
    for main in (sample.main, evaluate.main):
        assert main(["--save_dir", save]) == 2
        line = error_line(capsys)
        assert f"checkpoint {poisoned} holds NaN or infinite weights" in line
    assert train.main(train_flags(data, save, "--init_from", save)) == 2
    assert "holds NaN or infinite weights" in error_line(capsys)


@pytest.mark.slow
def test_the_server_refuses_nan_weights_at_start_in_one_line(trained_copy):
    save, _ = trained_copy
    poison_newest_checkpoint(save)
    result = run_script("sample_server.py", "--save_dir", save, "--port", free_port(), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: checkpoint ")
    assert "Traceback" not in result.stderr + result.stdout


def test_a_temperature_float32_rounds_to_zero_is_refused_and_a_tiny_one_is_argmax(trained_save_dir):
    sampler = Sampler.load(trained_save_dir)
    with pytest.raises(ValueError, match="temperature must be a number from"):
        sampler.sample("the ", 20, temperature=1e-45)
    assert sampler.sample("the ", 100, mode=1, temperature=1e-30, seed=4) == sampler.sample("the ", 100, mode=0)


# ----------------------------------------------------------------------------------------------------------
# Missing and damaged checkpoints


def test_a_deleted_newest_index_falls_back_with_a_warning(trained_copy, capsys):
    save, _ = trained_copy
    newest, before = checkpoints.checkpoint_paths(save)[:2]
    os.remove(newest + ".index")
    assert savedir.load(save).path == before
    err = capsys.readouterr().err
    assert f"warning: checkpoint {newest} is listed" in err and ".index file is missing" in err


# ----------------------------------------------------------------------------------------------------------
# Disks that cannot be written


@contextlib.contextmanager
def small_filesystem(path, size="2m"):
    """A tmpfs of `size` mounted at `path` (root only); yields True, or False where it cannot be mounted."""
    os.makedirs(path)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory, leave=0):
    """Fill the file system of `directory` but `leave` bytes; returns the filler file's path."""
    filler = os.path.join(directory, "filler")
    with open(filler, "wb", buffering=0) as f:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
        f.truncate(max(f.tell() - leave, 0))
    return filler


TF_OUT_OF_SPACE = ("{{{{function_node __wrapped__SaveV2_dtypes_31_device_/job:localhost/replica:0/task:0/"
                   "device:CPU:0}}}} {temporary}/part-00000-of-00001.data-00000-of-00001.tempstate11394990919901407557; "
                   "No space left on device [Op:SaveV2]\nmore detail")


def assert_plain_out_of_space_line(line, save):
    """The line of a full disk names the save dir and the cause in plain words, without TensorFlow's internals."""
    assert "No space left on device" in line and save in line, line
    for internal in ("{{function_node", "__wrapped__", "[Op:", "_temp", "tempstate"):
        assert internal not in line, line


@pytest.mark.parametrize("room", [0, 16 << 10])  # nothing left; room for config.yaml but not a checkpoint
def test_a_full_disk_is_one_line_and_keeps_every_earlier_checkpoint(tmp_path, data_dir, capsys, room):
    with small_filesystem(tmp_path / "disk") as mounted:
        if not mounted:  # not root: the injected out-of-space error below covers the checkpoint path
            return
        save = str(tmp_path / "disk" / "save")
        assert train.main(train_flags(data_dir, save, "--max_steps", 4, "--save_every", 2)) == 0
        before = models(snapshot(save))
        filler = fill(str(tmp_path / "disk"), room)
        capsys.readouterr()
        assert train.main(train_flags(data_dir, save, "--init_from", save, "--max_steps", 8, "--save_every", 2)) == 1
        assert_plain_out_of_space_line(error_line(capsys), save)
        assert not glob.glob(os.path.join(save, "*_temp*")) and not os.path.exists(os.path.join(save, "best.new"))
        assert models(snapshot(save)) == before
        assert checkpoints.checkpoint_step(savedir.load(save).path) == 4
        os.remove(filler)
        assert train.main(train_flags(data_dir, save, "--init_from", save, "--max_steps", 8)) == 0


def test_an_out_of_space_checkpoint_write_is_one_line_and_removes_its_temporary_folder(tmp_path, data_dir, capsys,
                                                                                       monkeypatch):
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--max_steps", 4, "--save_every", 2)) == 0
    before = models(snapshot(save))

    def full(manager, checkpoint_number):
        temporary = os.path.join(save, f"{checkpoints.CHECKPOINT_NAME}-{checkpoint_number}_temp")
        os.makedirs(temporary)  # as TensorFlow does, and with its message (TensorFlow 2.21, a full tmpfs)
        raise tf.errors.ResourceExhaustedError(None, None, TF_OUT_OF_SPACE.format(temporary=temporary))
    monkeypatch.setattr(tf.train.CheckpointManager, "save", full)
    assert train.main(train_flags(data_dir, save, "--init_from", save, "--max_steps", 8, "--save_every", 2)) == 1
    line = error_line(capsys)
    assert "cannot write the checkpoint of step 6 (No space left on device);" in line
    assert_plain_out_of_space_line(line, save)
    assert not glob.glob(os.path.join(save, "*_temp*")) and not os.path.exists(os.path.join(save, "best.new"))
    assert models(snapshot(save)) == before


def test_a_read_only_save_dir_is_one_line_and_unchanged(trained_copy, capsys):
    save, data = trained_copy
    before = snapshot(save)
    with read_only(save):
        assert train.main(train_flags(data, save, "--init_from", save, "--max_steps", 500)) == 1
    line = error_line(capsys)
    assert save in line
    assert snapshot(save) == before


def test_a_log_dir_that_cannot_be_made_is_one_line_before_training(tmp_path, data_dir, capsys):
    (tmp_path / "a-file").write_text("")
    save = tmp_path / "save"
    assert train.main(train_flags(data_dir, str(save), "--log_dir", tmp_path / "a-file" / "logs")) == 1
    assert str(tmp_path / "a-file") in error_line(capsys)
    assert not checkpoints.has_checkpoint(str(save))


# ----------------------------------------------------------------------------------------------------------
# Resuming


def test_init_from_takes_the_model_settings_from_the_checkpoint(tmp_path, capsys):
    old = shutil.copytree(OLD_SAVE_DIR, tmp_path / "old")
    data = make_data_dir(tmp_path / "data", OLD_EXPECTED["train_text"])
    assert train.main(["--data_dir", data, "--save_dir", str(old), "--init_from", str(old), "--max_steps", "274"]) == 0
    out = capsys.readouterr().out
    assert "from the checkpoint: model lstm, rnn_size 8, num_layers 2" in out
    assert checkpoints.checkpoint_step(checkpoints.checkpoint_paths(str(old))[0]) == 274
    # A setting given that differs is still refused, naming it.
    assert train.main(["--data_dir", data, "--save_dir", str(old), "--init_from", str(old), "--rnn_size", "16"]) == 2
    assert "rnn_size is 16 here but 8" in error_line(capsys)


def test_resuming_into_another_save_dir_with_no_step_left_writes_best_there(trained_copy, tmp_path):
    save, data = trained_copy
    other = str(tmp_path / "other")
    done = checkpoints.checkpoint_step(checkpoints.checkpoint_paths(save)[0])
    assert train.main(train_flags(data, other, "--init_from", save, "--max_steps", done)) == 0
    info = savedir.read_yaml(os.path.join(other, savedir.BEST_DIR, savedir.MODEL_INFO_FILE))
    assert info["step"] == done and info["score_is"] == "val_loss"
    assert checkpoints.checkpoint_step(savedir.load(os.path.join(other, savedir.BEST_DIR)).path) == done


def test_metrics_keep_one_row_per_step_and_the_clock_goes_on_after_a_crash(tmp_path, data_dir):
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--max_steps", 10, "--save_every", 5, "--print_every", 1)) == 0
    newest = checkpoints.checkpoint_paths(save)[0]
    for path in glob.glob(newest + ".*"):  # as if killed after step 10's row but before its checkpoint
        os.remove(path)
    assert train.main(train_flags(data_dir, save, "--init_from", save, "--max_steps", 10, "--save_every", 5,
                                  "--print_every", 1)) == 0
    with open(os.path.join(save, savedir.METRICS_FILE), newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["train_loss"]]
    assert [int(row["step"]) for row in rows] == list(range(1, 11))
    elapsed = [float(row["elapsed_s"]) for row in rows]
    assert elapsed == sorted(elapsed)


# ----------------------------------------------------------------------------------------------------------
# Ctrl-C


def interrupt_train(tmp_path, data_dir, when):
    """Start train.py, send SIGINT once `when(log text)` holds; returns (exit code, stderr lines, save dir)."""
    save = str(tmp_path / "save")
    log_path = tmp_path / "out.log"
    with open(log_path, "w") as out, open(tmp_path / "err.log", "w") as err, ctrl_c_not_ignored():
        process = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"),
                                    *train_flags(data_dir, save, "--print_every", 1)],
                                   stdout=out, stderr=err, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not when(log_path.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=SPAWN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return code, (tmp_path / "err.log").read_text().strip().splitlines(), save


@pytest.mark.slow
def test_ctrl_c_while_tensorflow_loads_is_one_line_and_exit_130(tmp_path, data_dir):
    started = time.monotonic()
    code, err, save = interrupt_train(tmp_path, data_dir, lambda out: time.monotonic() - started > 0.5)
    assert code == 130 and err == ["interrupted"], err
    assert not checkpoints.has_checkpoint(save)


@pytest.mark.slow
def test_ctrl_c_before_the_first_step_writes_no_checkpoint(tmp_path, data_dir):
    code, err, save = interrupt_train(tmp_path, data_dir, lambda out: "tokens, vocabulary of" in out)
    assert code == 130
    assert err[-1] == "interrupted: nothing new to save (no step was made)" or err == ["interrupted"], err
    assert not any("Traceback" in line for line in err)
    assert not checkpoints.has_checkpoint(save)
    # The save dir is free for a fresh run, and sample.py says there is no model instead of sampling noise.
    assert train.main(train_flags(data_dir, save, "--max_steps", 2)) == 0


# ----------------------------------------------------------------------------------------------------------
# Serving


def serving_get(url, timeout=60):
    """GET url; returns (status, body as text), whatever the status."""
    status, _, body = get(url, timeout)
    return status, body


@contextlib.contextmanager
def serving(save_dir, log_path, *flags):
    """A sample_server.py process on 127.0.0.1, ready; yields (process, url); ended and waited for at the end."""
    with running_server(save_dir, log_path, *flags) as server:
        yield server.process, server.url


def test_a_stopped_generator_raises_generation_stopped_from_any_thread(trained_save_dir):
    import threading

    from errors import GenerationStopped
    sampler = Sampler.load(trained_save_dir)
    expected = sampler.sample("the", 300, seed=4)
    threading.Timer(0.5, sampler.generator.stop).start()
    started = time.monotonic()
    with pytest.raises(GenerationStopped, match="stopped after"):
        sampler.sample("the", 10_000_000, seed=4)  # minutes of generation without the stop
    assert time.monotonic() - started < 30
    with pytest.raises(GenerationStopped):
        sampler.sample("the", 1)
    assert sampler.sample("the", 0) == "the"
    assert Sampler.load(trained_save_dir).sample("the", 300, seed=4) == expected  # a fresh sampler is unaffected


@pytest.mark.slow
def test_sigterm_stops_a_huge_generation_within_seconds_and_answers_it_503(trained_save_dir, tmp_path):
    import threading
    log_path = str(tmp_path / "server.log")
    answers = []
    with serving(trained_save_dir, log_path, "--max_batch", 1, "--max_n", 50_000_000) as (process, url):
        # Minutes of generation (the tiny model makes about 150,000 tokens a second on 2 cores): without a bound,
        # shutdown would wait for all of it.
        asking = threading.Thread(target=lambda: answers.append(
            serving_get(f"{url}/?prime=the&n=50000000&seed=1", timeout=120)))
        asking.start()
        time.sleep(1.0)  # it is generating now
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        seconds = time.monotonic() - signalled
        asking.join(timeout=60)
    log = open(log_path).read()
    assert process.returncode == 0 and seconds < 15, (process.returncode, seconds, log)
    status, body = answers[0]
    assert status == 503 and body == "the server is shutting down; the generation was stopped\n", (status, body)
    assert "Traceback" not in log


@pytest.mark.slow
def test_80_silent_half_open_connections_delay_a_request_by_seconds_at_most(trained_save_dir, tmp_path):
    with serving(trained_save_dir, str(tmp_path / "server.log"), "--max_n", 1_000_000) as (process, url):
        port = int(url.rsplit(":", 1)[1])
        silent = []
        try:
            for _ in range(80):  # more than the worker threads (--max_batch + --queue + 4 = 68)
                client = socket.create_connection(("127.0.0.1", port), timeout=10)
                silent.append(client)
                client.sendall(b"GET /?prime=the&n=5 HT")  # part of a request line, then nothing
            time.sleep(0.5)
            started = time.monotonic()
            status, _ = serving_get(f"{url}/?prime=the&n=5&seed=1", timeout=60)
            seconds = time.monotonic() - started
            assert status == 200 and seconds < 8, (status, seconds)
        finally:
            for client in silent:
                client.close()
        # The short socket timeout does not cut off a generation that takes longer than it.
        started = time.monotonic()
        assert serving_get(f"{url}/?prime=the&n=20000&seed=1")[0] == 200
        n = min(1_000_000, int(20_000 * 5.0 / (time.monotonic() - started)))  # about 5 s, over the 2 s timeout
        started = time.monotonic()
        status, body = serving_get(f"{url}/?prime=the&n={n}&seed=1", timeout=120)
        assert status == 200 and len(body) == 3 + n, (status, body[:200])
        assert time.monotonic() - started > 2.5
