"""train.py --sample_every: samples while training appear at the chosen steps (printed, in samples.txt and in
TensorBoard), change nothing of the training, and a resume drops the samples of the steps it replays.
(That a resumed run writes the uninterrupted run's samples: test_train.py's test_resume_continues_the_same_run.)"""
import glob
import os
import re

import numpy as np
import pytest
import tensorflow as tf

import savedir
import train
from conftest import train_flags
from sampler import Sampler
from settings import SampleSettings

SAMPLE_FLAGS = ["--sample_length", 30, "--sample_temperatures", "0.5,1"]


def samples_of(save_dir):
    """[(step, temperature, text)] of save_dir/samples.txt, in order."""
    with open(os.path.join(save_dir, savedir.SAMPLES_FILE), encoding="utf-8") as f:
        entries = re.split(r"^step (\d+), temperature (\S+), seed (\d+):\n", f.read(), flags=re.MULTILINE)
    assert entries[0] == ""
    return [(int(step), float(temperature), text.removesuffix("\n\n"))
            for step, temperature, _, text in zip(*[iter(entries[1:])] * 4)]


def logged_texts(log_dir):
    """{(tag, step): text} of the TensorBoard text summaries under log_dir."""
    texts = {}
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "text":
                    texts[value.tag, event.step] = tf.make_ndarray(value.tensor).item().decode("utf-8")
    return texts


@pytest.mark.parametrize("every, expected_steps", [
    (0, [10, 20, 25]),  # with each checkpoint: every --save_every steps and the last
    (7, [7, 14, 21]),
])
def test_samples_appear_at_the_chosen_steps(tmp_path, data_dir, capsys, every, expected_steps):
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--max_steps", 25, "--save_every", 10, "--sample_every", every,
                                  *SAMPLE_FLAGS)) == 0
    samples = samples_of(save)
    assert [(step, temperature) for step, temperature, _ in samples] == [
        (step, temperature) for step in expected_steps for temperature in (0.5, 1.0)]
    assert all(len(text) == 30 for _, _, text in samples)  # 30 characters after the empty prime
    printed = capsys.readouterr().out
    for step, temperature, text in samples:
        assert f"sample at step {step}, temperature {temperature:g}:\n{text}\n" in printed
    assert logged_texts(os.path.join(save, savedir.LOG_DIR)) == {
        (f"sample/temperature_{temperature:g}", step): f"```\n{text}\n```" for step, temperature, text in samples}
    # One seed at every step: the samples differ by what the model learned, so the first and last differ.
    assert samples[0][2] != samples[-1][2]
    # Each from the weights of its step: the last ones are sample.py's of the last checkpoint, which also starts the
    # prime from those weights' states.
    if every == 0:
        fresh = Sampler.load(save)
        assert [text for step, _, text in samples if step == 25] == [
            fresh.run(SampleSettings("", 30, temperature=temperature, seed=0)) for temperature in (0.5, 1.0)]


def test_no_samples_with_sample_every_minus_one(tmp_path, data_dir, capsys):
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--max_steps", 5, "--sample_every", -1)) == 0
    assert not os.path.exists(os.path.join(save, savedir.SAMPLES_FILE))
    assert "sample at step" not in capsys.readouterr().out


def checkpoint_values(save_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(save_dir))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if not key.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


def test_training_with_and_without_samples_gives_the_same_weights(tmp_path, data_dir):
    """Dropout draws from the training's random state: a sample that touched it would change the weights."""
    runs = {}
    for every in (-1, 3):
        save = str(tmp_path / f"save{every}")
        assert train.main(train_flags(data_dir, save, "--max_steps", 12, "--dropout", 0.25, "--sample_every", every,
                                      *SAMPLE_FLAGS)) == 0
        runs[every] = checkpoint_values(save)
    assert sorted(runs[3]) == sorted(runs[-1])
    for key, value in runs[-1].items():  # weights, Adam's moments, carried state, dropout's random state
        np.testing.assert_array_equal(runs[3][key], value, err_msg=key)


def test_a_resume_drops_the_samples_of_the_steps_it_replays(tmp_path):
    path = str(tmp_path / savedir.SAMPLES_FILE)
    entries = [savedir.SAMPLE_HEADER.format(step=step, temperature=1.0, seed=0) + f"\ntext of {step}\n\n"
               for step in (5, 10, 15)]
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(entries))
    savedir.keep_samples_until(path, 10)
    with open(path, encoding="utf-8") as f:
        assert f.read() == "".join(entries[:2])


@pytest.mark.parametrize("flag, value", [("--sample_every", "-2"), ("--sample_temperatures", "0.5,warm"),
                                         ("--sample_temperatures", "0"), ("--sample_length", "0")])
def test_a_bad_sample_flag_is_one_line(tmp_path, data_dir, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_flags(data_dir, str(tmp_path / "save"), flag, value))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {value!r} is not " in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "save")
