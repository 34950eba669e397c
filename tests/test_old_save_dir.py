"""Users' trained models survive new versions: a small save dir written by an earlier version of train.py
(tests/fixtures/lstm_2x8_save, with what it sampled and evaluated to in lstm_2x8_expected.json) must load, sample
the same text for the same settings and seed, evaluate to the same loss, and resume training."""
import json
import os
import shutil

import pytest

import checkpoints
import evaluation
import savedir
import train
from conftest import REPO, make_data_dir, run_script
from sampler import Sampler
from settings import MAX_LOGPROBS, SampleSettings

FIXTURES = os.path.join(REPO, "tests", "fixtures")
OLD_SAVE_DIR = os.path.join(FIXTURES, "lstm_2x8_save")
with open(os.path.join(FIXTURES, "lstm_2x8_expected.json"), encoding="utf-8") as _f:
    EXPECTED = json.load(_f)
SETTINGS = ("prime", "n", "mode", "temperature", "seed", "top_k")


@pytest.fixture
def old_save_dir(tmp_path):
    """A private copy, so that no test writes into the repository."""
    return shutil.copytree(OLD_SAVE_DIR, tmp_path / "save")


@pytest.fixture(scope="module")
def old_sampler():
    return Sampler.load(OLD_SAVE_DIR)


@pytest.mark.parametrize("case", EXPECTED["samples"], ids=lambda case: f"mode{case['mode']}-seed{case['seed']}")
def test_old_save_dir_samples_the_same_text(old_sampler, case):
    assert old_sampler.sample(**{name: case[name] for name in SETTINGS}) == case["text"]


@pytest.mark.slow
def test_sample_py_prints_the_same_text_from_the_old_save_dir(old_save_dir):
    case = EXPECTED["samples"][0]
    result = run_script("sample.py", "--save_dir", old_save_dir, "--prime", case["prime"], "-n", case["n"],
                        "--sample", case["mode"], "--temperature", case["temperature"], "--seed", case["seed"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == case["text"] + "\n"


def test_old_save_dir_evaluates_to_the_same_loss(old_sampler):
    expected = EXPECTED["eval"]
    loss, count = evaluation.full_pass_loss(savedir.load(OLD_SAVE_DIR).model, old_sampler.encode(expected["text"]))
    assert count == expected["tokens"]
    assert loss == pytest.approx(expected["loss"], abs=1e-5)


def test_old_save_dir_resumes_training(old_save_dir, tmp_path, capsys):
    data = make_data_dir(tmp_path / "data", EXPECTED["train_text"])
    code = train.main(["--data_dir", data, "--save_dir", str(old_save_dir), "--init_from", str(old_save_dir),
                       "--rnn_size", "8", "--num_layers", "2", "--batch_size", "4", "--seq_length", "10",
                       "--val_frac", "0", "--max_steps", "275", "--print_every", "1000"])
    assert code == 0, capsys.readouterr().err
    assert "resumed from" in capsys.readouterr().out
    assert checkpoints.checkpoint_step(checkpoints.checkpoint_paths(str(old_save_dir))[0]) == 275


@pytest.mark.parametrize("case", EXPECTED["samples"][:2], ids=lambda case: f"mode{case['mode']}-seed{case['seed']}")
def test_penalties_at_zero_and_asking_for_logprobs_leave_the_old_texts_byte_identical(old_sampler, case):
    settings = SampleSettings(**{name: case[name] for name in SETTINGS}, frequency_penalty=0.0,
                              presence_penalty=0.0, logprobs=MAX_LOGPROBS)
    [sample] = old_sampler.samples(settings, 1)
    assert sample.text == case["text"] and len(sample.logprobs) == case["n"]
