"""Shared fixtures: small corpora, a helper that runs a script as a user would, and a tiny trained save dir."""
import atexit
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# The real corpus, for the few tests that need it: the mirror CI points at, else the shared copy beside the repo.
SHARED_CORPUS = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare", "input.txt")
REAL_CORPUS = os.environ.get("CHAR_RNN_DATA_URL") or SHARED_CORPUS

# XLA's compilation cache (cli.use_compilation_cache) goes to a folder of this test session, not the user's.
XLA_CACHE = tempfile.mkdtemp(prefix="char-rnn-tests-xla-")
atexit.register(shutil.rmtree, XLA_CACHE, True)
os.environ.setdefault("CHAR_RNN_XLA_CACHE", XLA_CACHE)

# A small text with a clear structure, so that a tiny model learns it within a few dozen steps.
TINY_TEXT = ("the cat sat on the mat.\nthe dog sat on the log.\n" * 60)
# Flags for a model small enough to train in seconds.
TINY_MODEL = ["--rnn_size", "16", "--num_layers", "1", "--batch_size", "4", "--seq_length", "10"]


@contextlib.contextmanager
def ctrl_c_not_ignored():
    """A child started in here handles Ctrl-C even when this process ignores SIGINT (a job started in the
    background by a shell without job control): the child inherits an ignored signal, and Python keeps it ignored."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        if previous is signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)


def run_script(script, *args, cwd=None, timeout=300, env=None):
    """Run one of the top-level scripts as a separate process; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def make_data_dir(path, text=TINY_TEXT):
    """Create a data dir holding `text` as input.txt; returns its path as a string."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "input.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def train_flags(data_dir, save_dir, *extra):
    """train.py flags for the tiny model, quiet (no samples while training, unless `extra` asks), repeatable."""
    return ["--data_dir", data_dir, "--save_dir", save_dir, *TINY_MODEL, "--seed", "1", "--print_every", "1000",
            "--sample_every", "-1", *map(str, extra)]


def snapshot(directory):
    """{relative path: SHA-256} of every file under a directory."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return files


def error_line(capsys):
    """The one line a refused run printed on stderr (asserting it is one line, and no traceback)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def newest_step(save_dir):
    """The step of the newest checkpoint the save dir's index names."""
    import tensorflow as tf

    import checkpoints
    return checkpoints.checkpoint_step(tf.train.latest_checkpoint(save_dir))


def assert_best_describes_its_weights(save_dir, data_dir):
    """best/model_info.yaml names the step of the checkpoint beside it and that model's validation loss."""
    import checkpoints
    import evaluation
    import savedir
    import utils
    best = os.path.join(save_dir, savedir.BEST_DIR)
    if not os.path.isdir(best):  # killed between the two renames of a swap: best.old/ is the complete set
        best = os.path.join(save_dir, savedir.BEST_DIR + ".old")
    info = savedir.read_yaml(os.path.join(best, savedir.MODEL_INFO_FILE))
    loaded = savedir.load(best)
    assert checkpoints.checkpoint_step(loaded.path) == info["step"]
    loader = utils.TextLoader(data_dir, 4, 10)
    val_loss, _ = evaluation.full_pass_loss(loaded.model, loader.val_ids)
    assert val_loss == pytest.approx(info["val_loss"], abs=1e-4)


SPAWN_TIMEOUT_S = 120  # a trainer subprocess must reach an awaited point within this (TensorFlow loads slowly)


def wait_for(condition, process, what):
    """Poll condition() until it holds, failing if the process exits first or SPAWN_TIMEOUT_S pass."""
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not condition():
        assert process.poll() is None, f"the trainer exited ({process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {SPAWN_TIMEOUT_S}s"
        time.sleep(0.05)


@pytest.fixture
def data_dir(tmp_path):
    """A fresh data dir with the tiny corpus."""
    return make_data_dir(tmp_path / "data")


@pytest.fixture(scope="session")
def trained_save_dir(tmp_path_factory):
    """A tiny character-level model trained for a few epochs (shared by the sampling and serving tests)."""
    import train
    root = tmp_path_factory.mktemp("trained")
    data = make_data_dir(root / "data")
    save = str(root / "save")
    code = train.main(["--data_dir", data, "--save_dir", save, *TINY_MODEL, "--num_epochs", "3",
                       "--save_every", "50", "--print_every", "50", "--seed", "1"])
    assert code == 0
    return save


@pytest.fixture
def trained_copy(trained_save_dir, tmp_path):
    """A private copy of the session's trained save dir; returns (save_dir, data_dir)."""
    import savedir
    save = str(tmp_path / "save")
    shutil.copytree(trained_save_dir, save)
    return save, savedir.read_config(save)["data_dir"]
