"""evaluate.py and repeatable runs: the loss train.py prints is the loss evaluate.py measures; a seed repeats."""
import json
import re

import pytest

from conftest import TINY_MODEL, run_script

LOSS = re.compile(r"train_loss = ([0-9.]+)")


def train_cli(data_dir, save_dir, *args):
    result = run_script("train.py", "--data_dir", data_dir, "--save_dir", save_dir, *TINY_MODEL, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_evaluate_matches_the_validation_loss_train_printed(data_dir, tmp_path):
    save = str(tmp_path / "save")
    out = train_cli(data_dir, save, "--num_epochs", "2", "--print_every", "1000", "--seed", "3")
    printed = float(re.findall(r"val_loss = ([0-9.]+)", out)[-1])
    result = run_script("evaluate.py", "--save_dir", save, "--json")
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["loss_nats"] == pytest.approx(printed, abs=1e-3)
    assert measured["perplexity"] == pytest.approx(2.718281828 ** measured["loss_nats"], rel=1e-6)
    assert measured["tokens"] > 100


def test_same_seed_same_first_20_losses_other_seed_differs(data_dir, tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = train_cli(data_dir, str(tmp_path / name), "--max_steps", "20", "--print_every", "1",
                        "--seed", str(seed), "--dropout", "0.1")
        runs[name] = LOSS.findall(out)
        assert len(runs[name]) == 20
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_evaluate_text_refuses_unknown_characters_by_name(trained_save_dir, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("the cat sat on the zebra\n", encoding="utf-8")
    result = run_script("evaluate.py", "--save_dir", trained_save_dir, "--text", text)
    assert result.returncode == 2
    assert "'z', 'b', 'r'" in result.stderr and "Traceback" not in result.stderr
    text.write_text("the cat sat on the mat\n", encoding="utf-8")
    result = run_script("evaluate.py", "--save_dir", trained_save_dir, "--text", text)
    assert result.returncode == 0 and "nats/token" in result.stdout and "perplexity" in result.stdout
