"""evaluate.py and repeatable runs: the loss train.py prints is the loss evaluate.py measures, and both are the
mean of every next token's loss computed one token at a time; a seed repeats."""
import json
import math
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

import evaluate
import evaluation
import savedir
import train
from conftest import TINY_MODEL, TINY_TEXT, make_data_dir, run_script

LOSS = re.compile(r"train_loss = ([0-9.]+)")


def train_cli(data_dir, save_dir, *args):
    result = run_script("train.py", "--data_dir", data_dir, "--save_dir", save_dir, *TINY_MODEL, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
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


@pytest.mark.slow
def test_same_seed_same_first_20_losses_other_seed_differs(data_dir, tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = train_cli(data_dir, str(tmp_path / name), "--max_steps", "20", "--print_every", "1",
                        "--seed", str(seed), "--dropout", "0.1")
        runs[name] = LOSS.findall(out)
        assert len(runs[name]) == 20
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


@pytest.mark.slow
def test_evaluate_text_refuses_unknown_characters_by_name(trained_save_dir, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("the cat sat on the zebra\n", encoding="utf-8")
    result = run_script("evaluate.py", "--save_dir", trained_save_dir, "--text", text)
    assert result.returncode == 2
    assert "'z', 'b', 'r'" in result.stderr and "Traceback" not in result.stderr
    text.write_text("the cat sat on the mat\n", encoding="utf-8")
    result = run_script("evaluate.py", "--save_dir", trained_save_dir, "--text", text)
    assert result.returncode == 0 and "nats/token" in result.stdout and "perplexity" in result.stdout


# ----------------------------------------------------------------------------------------------------------
# The loss measured independently: one token at a time through model.step, each stream from a zero state


def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference_loss(model, ids, num_streams):
    """(mean next-token loss in nats, predicted token count) computed token by token with model.step.

    As the README describes the full pass: the len(ids) - 1 predictions are cut into `num_streams` contiguous
    streams of ceil(count / streams) predictions (the last one shorter), each read from a zero state.
    """
    ids = [int(i) for i in ids]
    count = len(ids) - 1
    length = -(-count // max(1, min(num_streams, count)))
    starts = list(range(0, count, length))
    states = model.zero_state(len(starts))
    total = 0.0
    for t in range(length):
        # Every stream steps at once (rows are independent); a finished stream's row is never counted.
        inputs = [ids[min(start + t, count - 1)] for start in starts]
        logits, states = model.step(tf.constant(inputs, tf.int32), states)
        log_probs = log_softmax(logits.numpy())
        for row, start in enumerate(starts):
            position = start + t
            if position < min(start + length, count):
                total -= log_probs[row, ids[position + 1]]
    return total / count, count


def evaluate_json(capsys, *args):
    """Run evaluate.py's main in this process with --json; returns its result."""
    capsys.readouterr()
    assert evaluate.main([*map(str, args), "--json"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    return json.loads(out)


def char_ids(vocab, text):
    return [vocab.index(c) for c in text]


@pytest.fixture(scope="module")
def loaded(trained_save_dir):
    return savedir.load(trained_save_dir)


# 101 characters (100 predictions): 32 streams of 4 leave 7 empty streams of padding; 1 stream has none.
OTHER_TEXT = ("the dog sat on the mat.\nthe cat sat on the log.\n" * 3)[:101]


@pytest.mark.parametrize("num_streams, chunk", [(32, evaluation.EVAL_CHUNK), (1, evaluation.EVAL_CHUNK), (32, 3),
                                                (1, 7), (200, evaluation.EVAL_CHUNK)])
def test_full_pass_loss_is_the_mean_token_loss_padding_not_counted(loaded, monkeypatch, num_streams, chunk):
    # chunk < the stream length: the state must be carried from one compiled chunk to the next.
    monkeypatch.setattr(evaluation, "EVAL_CHUNK", chunk)
    ids = char_ids(loaded.vocab, OTHER_TEXT)
    expected, count = reference_loss(loaded.model, ids, num_streams)
    loss, measured_count = evaluation.full_pass_loss(loaded.model, ids, num_streams=num_streams)
    assert measured_count == count == 100
    assert loss == pytest.approx(expected, rel=1e-4)


def test_one_stream_is_the_text_read_as_one_sequence(loaded):
    # The same 100 predictions, read by 1 and by 32 streams: only the streams' zero starts differ.
    ids = char_ids(loaded.vocab, OTHER_TEXT)
    one, _ = evaluation.full_pass_loss(loaded.model, ids, num_streams=1)
    many, _ = evaluation.full_pass_loss(loaded.model, ids, num_streams=32)
    assert one != pytest.approx(many, rel=1e-4)
    assert one < many  # a model that learnt the text predicts better with its context carried


def test_evaluate_text_is_the_mean_token_loss(loaded, trained_save_dir, tmp_path, capsys):
    path = tmp_path / "other.txt"
    path.write_text(OTHER_TEXT, encoding="utf-8")
    measured = evaluate_json(capsys, "--save_dir", trained_save_dir, "--text", path)
    expected, count = reference_loss(loaded.model, char_ids(loaded.vocab, OTHER_TEXT), evaluation.EVAL_STREAMS)
    assert measured["tokens"] == count == 100
    assert measured["loss_nats"] == pytest.approx(expected, rel=1e-4)
    assert measured["bits_per_token"] == pytest.approx(expected / math.log(2), rel=1e-4)
    assert measured["perplexity"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert measured["source"] == str(path)


@pytest.mark.parametrize("split", ["train", "val"])
def test_evaluate_split_measures_that_part_of_the_training_text(loaded, trained_save_dir, capsys, split):
    # The tiny model was trained on TINY_TEXT with the default --val_frac 0.05: the tail of int(5%) characters
    # is the validation split, the rest the training split.
    num_val = int(len(TINY_TEXT) * 0.05)
    part = TINY_TEXT[:-num_val] if split == "train" else TINY_TEXT[-num_val:]
    args = ["--split", split] if split == "train" else []
    measured = evaluate_json(capsys, "--save_dir", trained_save_dir, *args)
    expected, count = reference_loss(loaded.model, char_ids(loaded.vocab, part), evaluation.EVAL_STREAMS)
    assert measured["tokens"] == count == len(part) - 1
    assert measured["loss_nats"] == pytest.approx(expected, rel=1e-4)
    assert measured["source"].startswith(f"{split} split of ")


def test_evaluate_text_in_another_encoding(trained_save_dir, tmp_path, capsys):
    utf8, utf16 = tmp_path / "utf8.txt", tmp_path / "utf16.txt"
    utf8.write_text(OTHER_TEXT, encoding="utf-8")
    utf16.write_bytes(OTHER_TEXT.encode("utf-16"))  # with its byte-order mark, which is not a token
    expected = evaluate_json(capsys, "--save_dir", trained_save_dir, "--text", utf8)
    measured = evaluate_json(capsys, "--save_dir", trained_save_dir, "--text", utf16, "--encoding", "utf-16")
    assert measured["tokens"] == expected["tokens"] == 100
    assert measured["loss_nats"] == pytest.approx(expected["loss_nats"], rel=1e-6)
    assert evaluate.main(["--save_dir", trained_save_dir, "--text", str(utf16)]) == 2  # not UTF-8
    assert "not valid utf-8" in capsys.readouterr().err


@pytest.fixture(scope="module")
def utf16_model(tmp_path_factory):
    """A tiny character model trained on a UTF-16 input.txt with --encoding utf-16 (one step)."""
    import train
    root = tmp_path_factory.mktemp("utf16")
    data = root / "data"
    data.mkdir()
    text = TINY_TEXT.replace("cat", "caté")
    (data / "input.txt").write_bytes(text.encode("utf-16"))
    save = str(root / "save")
    assert train.main(["--data_dir", str(data), "--save_dir", save, *TINY_MODEL, "--max_steps", "1",
                       "--encoding", "utf-16", "--print_every", "1000", "--seed", "1"]) == 0
    return save, text


def test_evaluate_reads_data_and_text_in_the_models_encoding(utf16_model, tmp_path, capsys):
    save, text = utf16_model
    model = savedir.load(save)
    num_val = int(len(text) * 0.05)
    measured = evaluate_json(capsys, "--save_dir", save)
    expected, count = reference_loss(model.model, char_ids(model.vocab, text[-num_val:]), evaluation.EVAL_STREAMS)
    assert measured["tokens"] == count
    assert measured["loss_nats"] == pytest.approx(expected, rel=1e-4)
    # A --text without --encoding is read in the model's encoding.
    path = tmp_path / "other.txt"
    path.write_bytes(text[:300].encode("utf-16"))
    measured = evaluate_json(capsys, "--save_dir", save, "--text", path)
    expected, count = reference_loss(model.model, char_ids(model.vocab, text[:300]), evaluation.EVAL_STREAMS)
    assert measured["tokens"] == count == 299
    assert measured["loss_nats"] == pytest.approx(expected, rel=1e-4)


def test_evaluate_split_refuses_a_data_dir_whose_text_changed(trained_save_dir, tmp_path, capsys):
    # A copy of the tiny model whose data dir now holds another text: its split would be measured with the wrong
    # ids, so evaluate.py refuses it and points at --text.
    save = tmp_path / "save"
    shutil.copytree(trained_save_dir, save)
    config = savedir.read_config(str(save))
    config["data_dir"] = make_data_dir(tmp_path / "data", TINY_TEXT.replace("dog", "fox"))
    savedir.write_config(str(save), config)
    capsys.readouterr()
    assert evaluate.main(["--save_dir", str(save), "--json"]) == 2
    err = capsys.readouterr().err
    assert "no longer holds the text" in err and "--text" in err
    # The same text back: evaluated again.
    make_data_dir(tmp_path / "data", TINY_TEXT)
    assert evaluate_json(capsys, "--save_dir", save)["tokens"] == int(len(TINY_TEXT) * 0.05) - 1


def test_data_dir_flag_finds_the_training_text_from_any_directory(tmp_path, monkeypatch, capsys):
    """config.yaml stores data_dir as given to train.py (relative): --data_dir says where it is from elsewhere."""
    monkeypatch.chdir(tmp_path)
    make_data_dir(tmp_path / "data")
    assert train.main(["--data_dir", "data", "--save_dir", "save", *TINY_MODEL, "--max_steps", "5",
                       "--print_every", "1000", "--seed", "1"]) == 0
    here = evaluate_json(capsys, "--save_dir", "save")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert evaluate.main(["--save_dir", "../save"]) == 1
    assert "data/input.txt not found" in capsys.readouterr().err
    there = evaluate_json(capsys, "--save_dir", "../save", "--data_dir", "../data")
    assert (there["loss_nats"], there["tokens"]) == (here["loss_nats"], here["tokens"])
    assert there["source"] == "val split of ../data"
