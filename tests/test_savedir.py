"""Crash safety of the save dir, point by point: a failure injected at every file-system step of the best/ swap
and of an atomic write (an exception, or a hard exit of the process) leaves a complete, loadable model and the
user's files whole. The random SIGKILL test in test_train.py covers the same ground by chance; these cover it by
construction."""
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

import checkpoints
import files
import savedir
from conftest import REPO

VOCAB = ["\n", " ", "a", "b", "c"]
CONFIG = {"model": "lstm", "rnn_size": 4, "num_layers": 1, "word_level": False, "embedding_size": 4,
          "vocab_size": len(VOCAB), "dropout": 0.0}


class InjectedFailure(Exception):
    """The failure a test injects at one file-system step."""


def tiny_checkpoint(fill):
    """A tf.train.Checkpoint of a tiny model whose every weight is `fill` (so two saves are told apart)."""
    model = savedir.build_model(CONFIG)
    for weight in model.weights:
        weight.assign(tf.fill(weight.shape, float(fill)))
    return tf.train.Checkpoint(model=model)


def save_best(save_dir, step):
    """The real save_best for a tiny model whose weights are all `step` and whose info says that step."""
    savedir.save_best(save_dir, tiny_checkpoint(step), step, CONFIG, VOCAB, None, {"step": step, "score": -step})


def best_step(save_dir):
    """The step best/ holds after recovery, checking that its model_info.yaml describes the weights beside it."""
    savedir.recover_best(save_dir)
    best = os.path.join(save_dir, savedir.BEST_DIR)
    info = savedir.read_yaml(os.path.join(best, savedir.MODEL_INFO_FILE))
    loaded = savedir.load(best)
    assert checkpoints.checkpoint_step(loaded.path) == info["step"]
    assert all(float(tf.reduce_max(tf.abs(w - info["step"]))) == 0 for w in loaded.model.weights)
    assert sorted(os.listdir(save_dir)) == [savedir.BEST_DIR], "a best.new/ or best.old/ was left behind"
    return info["step"]


class StepCounter:
    """Wraps the file-system calls of a save: counts them, and fails at call number `fail_at` (1-based)."""

    CALLS = ("rename", "replace", "makedirs", "fsync")

    def __init__(self, monkeypatch, fail_at=None):
        self.count, self.fail_at, self.names = 0, fail_at, []
        for name in self.CALLS:
            monkeypatch.setattr(os, name, self.wrap(name, getattr(os, name)))
        monkeypatch.setattr(savedir.shutil, "rmtree", self.wrap("rmtree", savedir.shutil.rmtree))

    def wrap(self, name, function):
        def wrapped(*args, **kwargs):
            self.count += 1
            self.names.append(name)
            if self.count == self.fail_at:
                raise InjectedFailure(f"{name} (step {self.count})")
            return function(*args, **kwargs)
        return wrapped


def count_steps(tmp_path, monkeypatch):
    """How many file-system steps a best/ swap over an existing best/ takes."""
    save_dir = str(tmp_path / "count")
    save_best(save_dir, 1)
    with monkeypatch.context() as patch:
        counter = StepCounter(patch)
        save_best(save_dir, 2)
    assert {"rename", "rmtree"} <= set(counter.names)
    return counter.count


def test_a_failure_at_every_step_of_the_best_swap_leaves_the_old_or_the_new_best(tmp_path, monkeypatch):
    steps = count_steps(tmp_path, monkeypatch)
    outcomes = []
    for fail_at in range(1, steps + 1):
        save_dir = str(tmp_path / f"fail{fail_at}")
        save_best(save_dir, 1)
        with monkeypatch.context() as patch:
            counter = StepCounter(patch, fail_at)
            with pytest.raises(InjectedFailure):
                save_best(save_dir, 2)
        outcome = best_step(save_dir)  # complete, loadable, and described by its own model_info.yaml
        assert outcome in (1, 2), f"failure at {counter.names[-1]} (step {fail_at})"
        outcomes.append(outcome)
    # Until the last rename the old best stands; after it, the new one.
    assert outcomes[0] == 1 and outcomes[-1] == 2
    assert outcomes == sorted(outcomes)


HARD_EXIT_CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    import test_savedir
    from test_savedir import savedir
    calls, fail_at = [0], int(sys.argv[2])
    real_rename = os.rename
    def rename(*args):
        calls[0] += 1
        if calls[0] == fail_at:
            os._exit(9)  # as a kill -9 or a power cut would: no cleanup, no finally
        real_rename(*args)
    os.rename = rename
    test_savedir.save_best(sys.argv[1], 2)
""")


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [1, 2])  # before best/ moves aside; between the two renames
def test_a_hard_exit_between_the_renames_of_the_swap_keeps_a_best(tmp_path, fail_at):
    save_dir = str(tmp_path / "save")
    save_best(save_dir, 1)
    child = HARD_EXIT_CHILD.format(repo=REPO, tests=os.path.join(REPO, "tests"))
    result = subprocess.run([sys.executable, "-c", child, save_dir, str(fail_at)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 9, result.stderr
    assert os.path.isdir(os.path.join(save_dir, savedir.BEST_DIR + (".new" if fail_at == 1 else ".old")))
    assert best_step(save_dir) == 1  # the swap never finished: the old best is put back whole


@pytest.mark.parametrize("failing", ["fsync", "replace"])  # after the data is written; at the rename
def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"old: 1\n")

    def fail(*args, **kwargs):
        raise InjectedFailure(failing)
    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(InjectedFailure):
        files.atomic_write_bytes(str(path), b"new: 2\n")
    assert path.read_bytes() == b"old: 1\n"
    assert os.listdir(tmp_path) == ["config.yaml"]


@pytest.mark.slow
def test_a_hard_exit_during_an_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_bytes(b"old")
    child = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {REPO!r})
        import files
        os.replace = lambda *args: os._exit(9)
        files.atomic_write_bytes({str(path)!r}, b"new")
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    assert path.read_bytes() == b"old"
