"""train.py and the training loop: the loss falls, resume continues the same run, saves survive kills, best/ is
the best model, and user mistakes end in one line on stderr without touching what the user had."""
import csv
import dataclasses
import glob
import os
import random
import socket

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import download
import savedir
import settings
import train
import utils
from conftest import (
    REPO,
    TINY_MODEL,
    TINY_TEXT,
    assert_best_describes_its_weights,
    error_line,
    make_data_dir,
    newest_step,
    run_script,
    snapshot,
    train_flags,
)


def metrics(save_dir, column):
    """[(step, value)] of one column of save_dir/metrics.csv, rows where it is filled."""
    with open(os.path.join(save_dir, savedir.METRICS_FILE), newline="") as f:
        return [(int(row["step"]), float(row[column])) for row in csv.DictReader(f) if row[column]]


# ----------------------------------------------------------------------------------------------------------
# Learning


@pytest.mark.slow
@pytest.mark.parametrize("dropout", ["0", "0.3"])
@pytest.mark.parametrize("num_layers", ["1", "3"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_loss_falls(tmp_path, data_dir, cell, num_layers, dropout):
    save = str(tmp_path / "save")
    code = train.main(train_flags(data_dir, save, "--model", cell, "--num_layers", num_layers, "--dropout", dropout,
                                  "--num_epochs", 2, "--learning_rate", 0.01, "--print_every", 1, "--val_frac", 0))
    assert code == 0
    losses = [loss for _, loss in metrics(save, "train_loss")]
    assert len(losses) == 2 * 71  # every step of two epochs of 71 batches
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    # Well below the ~2.3 nats a model of character frequencies alone would reach: it learned the sequence.
    assert last < first - 0.75, (first, last)


# ----------------------------------------------------------------------------------------------------------
# Resume


def checkpoint_values(save_dir):
    """{variable: value} of the newest checkpoint, without the bookkeeping that counts saves."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(save_dir))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if not key.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


@pytest.mark.slow
@pytest.mark.parametrize("total, split, dropout", [
    (100, 50, "0"),  # the second half crosses the end of epoch 0 (68 batches)
    (136, 68, "0"),  # the first half stops exactly at the end of an epoch
    (100, 50, "0.25"),  # dropout masks continue their random sequence
])
def test_resume_continues_the_same_run(tmp_path, data_dir, total, split, dropout, capsys):
    straight, halves = str(tmp_path / "straight"), str(tmp_path / "halves")
    flags = ["--save_every", split, "--dropout", dropout, "--sample_every", 20, "--sample_length", 40]
    assert train.main(train_flags(data_dir, straight, *flags, "--max_steps", total)) == 0
    assert train.main(train_flags(data_dir, halves, *flags, "--max_steps", split)) == 0
    assert newest_step(halves) == split
    capsys.readouterr()
    assert train.main(train_flags(data_dir, halves, *flags, "--max_steps", total, "--init_from", halves)) == 0
    assert f"resumed from {os.path.join(halves, 'model.ckpt-' + str(split))}: step {split}" in capsys.readouterr().out

    expected, resumed = checkpoint_values(straight), checkpoint_values(halves)
    assert sorted(resumed) == sorted(expected)
    for key in ("progress/step", "progress/epoch", "progress/batch_in_epoch", "optimizer/_learning_rate"):
        full_key = key + "/.ATTRIBUTES/VARIABLE_VALUE"
        assert resumed[full_key] == pytest.approx(expected[full_key]), key
    assert resumed["progress/step/.ATTRIBUTES/VARIABLE_VALUE"] == total
    for key, value in expected.items():  # weights, Adam's moments, carried state, best score
        np.testing.assert_allclose(resumed[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # best/ was kept by the resume and is the same model as the uninterrupted run's.
    best = [savedir.read_yaml(os.path.join(d, savedir.BEST_DIR, savedir.MODEL_INFO_FILE)) for d in (straight, halves)]
    assert best[1]["step"] == best[0]["step"]
    assert best[1]["val_loss"] == pytest.approx(best[0]["val_loss"], abs=1e-6)
    # The samples while training: the same steps, and the same texts for the same seed across the resume.
    samples = [open(os.path.join(d, savedir.SAMPLES_FILE), encoding="utf-8").read() for d in (straight, halves)]
    assert samples[1] == samples[0]
    assert samples[0].count("temperature 1, seed 0:\n") == total // 20


# ----------------------------------------------------------------------------------------------------------
# best/


def test_best_is_the_lowest_validation_loss(tmp_path):
    # The validation tail is characters the training text never has: the better the model learns the
    # training text, the worse it does there, so the best model is an early one, not the last.
    tail = "".join(random.Random(0).choice("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(200))
    data = make_data_dir(tmp_path / "data", TINY_TEXT + tail)
    save = str(tmp_path / "save")
    assert train.main(train_flags(data, save, "--save_every", 10, "--max_steps", 60, "--learning_rate", 0.01)) == 0
    val = metrics(save, "val_loss")
    assert [step for step, _ in val] == [10, 20, 30, 40, 50, 60]
    best_step, best_loss = min(val, key=lambda row: row[1])
    assert best_step < 60  # the premise: the last model is not the best one
    info = savedir.read_yaml(os.path.join(save, savedir.BEST_DIR, savedir.MODEL_INFO_FILE))
    assert info["step"] == best_step and info["score_is"] == "val_loss"
    assert info["val_loss"] == pytest.approx(best_loss, rel=1e-5)
    assert_best_describes_its_weights(save, data)


def test_best_without_validation_split_is_the_lowest_mean_training_loss(tmp_path, data_dir):
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--val_frac", 0, "--save_every", 10, "--print_every", 1,
                                  "--max_steps", 40)) == 0
    losses = dict(metrics(save, "train_loss"))
    assert metrics(save, "val_loss") == []
    means = {end: np.mean([losses[step] for step in range(end - 9, end + 1)]) for end in (10, 20, 30, 40)}
    best_step = min(means, key=means.get)
    info = savedir.read_yaml(os.path.join(save, savedir.BEST_DIR, savedir.MODEL_INFO_FILE))
    assert info["step"] == best_step and info["score_is"] == "mean train_loss" and info["val_loss"] is None
    assert info["score"] == pytest.approx(means[best_step], abs=1e-4)
    assert checkpoints.checkpoint_step(savedir.load(os.path.join(save, savedir.BEST_DIR)).path) == best_step


# ----------------------------------------------------------------------------------------------------------
# Refusals: one line, a non-zero exit code, nothing changed


@pytest.mark.parametrize("flags, field", [
    (["--rnn_size", "32"], "rnn_size"),
    (["--model", "gru"], "model"),
    (["--num_layers", "2"], "num_layers"),
    (["--word_level"], "word_level"),
    ([], "vocab_size"),  # other text, more characters
    ([], "vocabulary"),  # other text, as many characters
])
def test_incompatible_resume_is_refused_naming_the_field(trained_copy, tmp_path, capsys, flags, field):
    save, data = trained_copy
    if field == "vocab_size":
        data = make_data_dir(tmp_path / "other", "the quick brown fox jumps over the lazy dog.\n" * 60)
    elif field == "vocabulary":  # "c" becomes "b": 15 characters again, not the same ones
        data = make_data_dir(tmp_path / "other", TINY_TEXT.replace("c", "b"))
    before = snapshot(save)
    assert train.main(train_flags(data, save, "--init_from", save, *flags)) == 2
    line = error_line(capsys)
    assert line.startswith("error: cannot resume: ") and field in line, line
    assert snapshot(save) == before  # best/ included: same files, same bytes


def test_second_trainer_on_one_save_dir_is_refused(trained_copy, capsys):
    save, data = trained_copy
    before = snapshot(save)
    with savedir.SaveDir(save):
        assert train.main(train_flags(data, save, "--init_from", save, "--max_steps", 300)) == 2
    assert "another train.py is already training in" in error_line(capsys)
    assert snapshot(save) == before


def test_fresh_run_into_a_trained_save_dir_is_refused(trained_copy, capsys):
    save, data = trained_copy
    before = snapshot(save)
    assert train.main(train_flags(data, save, "--rnn_size", 32)) == 2
    assert f"{save} already holds a trained model; resume it with --init_from {save}" in error_line(capsys)
    assert snapshot(save) == before


def test_too_little_data_is_refused_naming_the_sizes(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data", "too short\n" * 3)
    assert train.main(train_flags(data, str(tmp_path / "save"), "--val_frac", 0)) == 2
    line = error_line(capsys)
    assert "batch_size 4 x seq_length 10" in line and "lower --batch_size and/or --seq_length" in line


def test_missing_input_is_one_line(tmp_path, capsys):
    assert train.main(train_flags(str(tmp_path / "nothing"), str(tmp_path / "save"))) == 1
    assert "input.txt not found: put your text in input.txt" in error_line(capsys)


def test_offline_default_corpus_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default data dir is relative
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/input.txt"
    assert train.main(train_flags(download.DEFAULT_DATA_DIR, "save", "--data_url", url)) == 1
    notice, error = capsys.readouterr().err.strip().splitlines()
    assert notice.startswith(f"downloading {url}")
    assert error.startswith("error: could not download the default corpus")
    assert f"put tinyshakespeare's input.txt at {os.path.join('data', 'tinyshakespeare', 'input.txt')}" in error
    assert not os.path.exists(os.path.join(download.DEFAULT_DATA_DIR, "input.txt")) and not os.path.exists("save")


def test_odd_code_points_reach_the_saved_vocabulary(tmp_path):
    text = "a\u0085b\u2028c\x00d\U0001F600e\n" * 40
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.txt").write_bytes((utils.BOM + text).encode("utf-8"))
    save = str(tmp_path / "save")
    assert train.main(train_flags(str(data), save, "--max_steps", 2)) == 0
    tokens, _ = savedir.read_vocab(save)
    assert sorted(tokens) == sorted(set(text))  # every odd code point is a token; the BOM is not
    assert savedir.read_config(save)["vocab_size"] == len(tokens)


@pytest.mark.slow
def test_invalid_utf8_is_one_line_from_train_py_and_latin1_reads_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.txt").write_bytes(TINY_TEXT.encode() + b"caf\xe9\n" + TINY_TEXT.encode())
    offset = len(TINY_TEXT.encode()) + 3
    result = run_script("train.py", *train_flags(str(data), str(tmp_path / "save"), "--max_steps", 2))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {data / 'input.txt'} is not valid utf-8 at byte offset {offset}: "
        f"convert it to UTF-8 or give its --encoding"]
    assert not os.path.exists(tmp_path / "save")
    assert train.main(train_flags(str(data), str(tmp_path / "save"), "--max_steps", 2, "--encoding", "latin-1")) == 0
    assert "\u00e9" in savedir.read_vocab(str(tmp_path / "save"))[0]


def test_resume_may_change_batch_size_seq_length_and_dropout(trained_copy, capsys):
    save, data = trained_copy
    step = newest_step(save)
    argv = train_flags(data, save, "--init_from", save, "--batch_size", 2, "--seq_length", 7, "--dropout", 0.2,
                       "--max_steps", step + 3)
    assert train.main(argv) == 0
    captured = capsys.readouterr()
    assert f"epoch {savedir.read_yaml(os.path.join(save, 'best', 'model_info.yaml'))['epoch']}" in captured.out
    assert "batch_size/seq_length changed" in captured.err
    assert newest_step(save) == step + 3


# ----------------------------------------------------------------------------------------------------------
# What the README documents: defaults, files, columns, logs, seed

# README's table of train.py flags, as values.
README_DEFAULTS = {
    "data_dir": os.path.join("data", "tinyshakespeare"), "save_dir": "save", "rnn_size": 128, "num_layers": 3,
    "model": "lstm", "batch_size": 50, "seq_length": 50, "num_epochs": 50, "save_every": 1000, "grad_clip": 5.0,
    "learning_rate": 0.002, "decay_rate": 0.97, "init_from": None, "word2vec_embedding": None, "dropout": 0.0,
    "print_every": 10, "word_level": False, "val_frac": 0.05, "seed": None, "log_dir": None, "encoding": "utf-8",
    "max_vocab": 0, "min_count": 1, "max_steps": 0, "data_url": None,
}


def readme_flag_table():
    """{flag name: default cell} of README's train.py flag table."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Training: `train.py`")[1].split("\n## ")[0]
    table = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`--"):
            flags = [flag.strip(" `-") for flag in cells[0].split(",")]
            defaults = [value.strip() for value in cells[1].replace("`", "").split(",")] if len(flags) > 1 else [
                cells[1].replace("`", "").strip()]  # one flag: its default may hold commas ("0.5,1.0")
            table.update(zip(flags, defaults))
    return table


def test_training_defaults_are_the_documented_ones():
    parsed = vars(train.build_parser().parse_args([]))
    assert {name: parsed.get(name, "missing") for name in README_DEFAULTS} == README_DEFAULTS
    assert dataclasses.asdict(settings.TrainConfig()) == parsed  # the library agrees with the command
    for flag, cell in readme_flag_table().items():  # and README's table says the same
        default = parsed[flag]
        if default is None:  # no value: the table describes what happens ("none", "random", "SAVE_DIR/logs" ...)
            assert not cell[:1].isdigit(), (flag, cell)
        elif isinstance(default, bool):
            assert cell == ("on" if default else "off"), (flag, cell)
        else:
            assert type(default)(cell) == default, (flag, cell)


def test_every_train_flag_is_in_the_readme_table():
    flags = {action.dest for action in train.build_parser()._actions if action.dest != "help"}
    assert sorted(readme_flag_table()) == sorted(flags)


def test_metrics_csv_has_the_documented_columns_and_each_epochs_decayed_learning_rate(tmp_path, data_dir):
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--num_epochs", 3, "--learning_rate", 0.01, "--decay_rate", 0.5,
                                  "--print_every", 1, "--save_every", 100)) == 0
    with open(os.path.join(save, savedir.METRICS_FILE), newline="") as f:
        assert f.readline().strip() == "step,epoch,train_loss,val_loss,learning_rate,tokens_per_s,elapsed_s"
    num_batches = utils.TextLoader(data_dir, 4, 10).num_batches
    with open(os.path.join(save, savedir.METRICS_FILE), newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["train_loss"]]
    assert [int(row["step"]) for row in rows] == list(range(1, 3 * num_batches + 1))
    for row in rows:
        epoch = (int(row["step"]) - 1) // num_batches
        assert int(row["epoch"]) == epoch, row
        assert float(row["learning_rate"]) == pytest.approx(0.01 * 0.5 ** epoch, rel=1e-5), row
        assert float(row["tokens_per_s"]) > 0 and float(row["elapsed_s"]) >= 0, row
    assert [step for step, _ in metrics(save, "val_loss")] == [100, 200, 3 * num_batches]
    # The optimizer the checkpoint holds is at the last epoch's rate.
    assert checkpoint_values(save)["optimizer/_learning_rate/.ATTRIBUTES/VARIABLE_VALUE"] == pytest.approx(0.0025)


def event_scalars(log_dir):
    """{tag: {step: value}} of the TensorBoard scalars written under log_dir."""
    scalars = {}
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return scalars


@pytest.mark.parametrize("log_dir", [None, "tensorboard"])
def test_tensorboard_logs_go_to_log_dir_default_save_dir_logs(tmp_path, data_dir, log_dir):
    save = str(tmp_path / "save")
    flags = ["--print_every", 1, "--save_every", 3, "--max_steps", 6]
    if log_dir:
        log_dir = str(tmp_path / log_dir)
        flags += ["--log_dir", log_dir]
    assert train.main(train_flags(data_dir, save, *flags)) == 0
    expected_dir = log_dir or os.path.join(save, "logs")
    if log_dir:
        assert not os.path.exists(os.path.join(save, "logs"))
    scalars = event_scalars(expected_dir)
    assert {"train_loss", "val_loss", "learning_rate", "tokens_per_s"} <= set(scalars), sorted(scalars)
    # The same curves as metrics.csv (which rounds to 6 digits).
    for column in ("train_loss", "val_loss", "learning_rate"):
        logged = scalars[column]
        assert sorted(logged) == [step for step, _ in metrics(save, column)]
        for step, value in metrics(save, column):
            assert logged[step] == pytest.approx(value, rel=1e-5), (column, step)


def test_save_dir_keeps_the_last_5_checkpoints(tmp_path, data_dir):
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--save_every", 1, "--max_steps", 12, "--val_frac", 0)) == 0
    indexes = sorted(os.path.basename(p) for p in glob.glob(os.path.join(save, "model.ckpt-*.index")))
    assert indexes == sorted(f"model.ckpt-{step}.index" for step in range(8, 13))
    assert [checkpoints.checkpoint_step(p) for p in tf.train.get_checkpoint_state(save).all_model_checkpoint_paths] \
        == list(range(8, 13))
    assert newest_step(save) == 12


@pytest.mark.slow
def test_seed_is_saved_in_config_and_the_same_seed_repeats_the_run(tmp_path, data_dir, capsys):
    def run(name, *seed_flags):
        save = str(tmp_path / name)
        flags = ["--data_dir", data_dir, "--save_dir", save, *TINY_MODEL, "--max_steps", "5", "--dropout", "0.3",
                 *seed_flags]
        assert train.main(flags) == 0
        return savedir.read_config(save)["seed"], checkpoint_values(save)

    given_seed, given = run("given", "--seed", "7")
    assert given_seed == 7
    random_seed, first = run("random")
    assert isinstance(random_seed, int) and 0 <= random_seed < 2 ** 31
    replayed_seed, replayed = run("replayed", "--seed", str(random_seed))
    assert replayed_seed == random_seed
    assert sorted(replayed) == sorted(first)
    for key, value in first.items():  # weights, optimizer, state: the same run
        np.testing.assert_allclose(replayed[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    if random_seed != 7:  # another seed, another run
        weights = [key for key in first if key.startswith("model/") and "head" in key]
        assert weights and any(not np.allclose(first[key], given[key]) for key in weights)


def test_weight_decay_shrinks_the_weights_and_is_recorded(tmp_path, data_dir):
    def run(name, *flags):
        save = str(tmp_path / name)
        assert train.main(["--data_dir", data_dir, "--save_dir", save, *TINY_MODEL, "--max_steps", "5", "--seed", "3",
                           "--learning_rate", "0.01", *flags]) == 0
        weights = {key: value for key, value in checkpoint_values(save).items()
                   if key.startswith("model/") and ("kernel" in key or "embeddings" in key)}
        return savedir.read_config(save)["weight_decay"], sum(float(np.sum(np.square(v))) for v in weights.values())

    plain_decay, plain = run("plain")
    decayed_decay, decayed = run("decayed", "--weight_decay", "0.9")
    assert (plain_decay, decayed_decay) == (0.0, 0.9)
    # 5 steps of 0.01 x 0.9: each weight shrinks by about 4.4% beyond the same gradient steps (the norm by 8.6%)
    assert decayed < 0.97 * plain, (decayed, plain)


def test_a_preset_sets_its_settings_under_the_flags_given_and_is_recorded(tmp_path, data_dir):
    save = str(tmp_path / "save")
    # fast's layers, learning rate and decay; rnn_size and num_epochs given beside it win.
    code = train.main(["--preset", "fast", "--data_dir", data_dir, "--save_dir", save, "--rnn_size", "8",
                       "--num_epochs", "1", "--batch_size", "4", "--seq_length", "10", "--print_every", "1000"])
    assert code == 0
    config = savedir.read_config(save)
    fast = settings.PRESETS["fast"].settings
    assert config["preset"] == "fast" and config["rnn_size"] == 8 and config["num_epochs"] == 1
    assert {name: config[name] for name in fast if name not in ("rnn_size", "num_epochs")} == \
        {name: value for name, value in fast.items() if name not in ("rnn_size", "num_epochs")}
    # Without a preset nothing changes: config.yaml says so, and the defaults are the original's.
    plain = str(tmp_path / "plain")
    assert train.main(train_flags(data_dir, plain, "--num_epochs", 1)) == 0
    assert savedir.read_config(plain)["preset"] is None
    assert settings.TrainConfig().num_layers == 3 and settings.TrainConfig().rnn_size == 128


def test_every_preset_is_listed_in_help_and_readme_and_an_unknown_one_is_one_line(capsys):
    help_text = train.build_parser().format_help()
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    for name, preset in settings.PRESETS.items():
        assert f"{name}:" in " ".join(help_text.split())
        assert f"`--preset {name}`" in readme
        settings.TrainConfig(**preset.settings)  # only train.py's settings
    with pytest.raises(SystemExit) as exited:
        train.main(["--preset", "fastest"])
    assert exited.value.code == 2
    assert "invalid choice: 'fastest'" in capsys.readouterr().err
