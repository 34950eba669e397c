"""The training loop in one process, step by step: the carried state, the epochs, the learning rate, clipped Adam
updates, the validation loss, an interrupt and a resume with another batch layout."""
import os
import random

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

import checkpoints
import evaluation
import savedir
import settings
import train
import trainer
import utils
from conftest import TINY_TEXT, make_data_dir, train_flags

TINY = dict(rnn_size=16, num_layers=1, batch_size=4, seq_length=10)


def build_trainer(data_dir, save_dir, **overrides):
    """A Trainer of the tiny model, built the way trainer.train builds it (without its lock and first line)."""
    config = settings.TrainConfig(**{**TINY, "data_dir": data_dir, "save_dir": save_dir, "seed": 1,
                                    "print_every": 1000, "save_every": 10 ** 6, **overrides})
    keras.utils.set_random_seed(config.seed)
    loader = utils.TextLoader(config.data_dir, config.batch_size, config.seq_length, config.val_frac)
    model_config, _ = trainer.network(config, loader)
    save = savedir.SaveDir(config.save_dir, config.log_dir)
    save.prepare(savedir.saved_settings(config, model_config, loader.unk_token), loader.vocab, loader.unk_token,
                 resuming_here=config.init_from == save_dir)
    return trainer.Trainer(config, loader, model_config, save)


def record_steps(run):
    """Wrap run.train_step: returns a list that gets, for every step, what it was given and what it left."""
    calls, real_step = [], run.train_step

    def train_step(inputs, targets):
        call = {"inputs": np.array(inputs), "state": run.progress.state.numpy(), "epoch": int(run.progress.epoch),
                "learning_rate": float(run.optimizer.learning_rate)}
        loss = real_step(inputs, targets)
        call["state_after"] = run.progress.state.numpy()
        calls.append(call)
        return loss
    run.train_step = train_step
    return calls


def weights_of(model):
    """The model's trainable weights as numpy arrays."""
    return [v.numpy() for v in model.trainable_variables]


# ----------------------------------------------------------------------------------------------------------
# The carried state (truncated backpropagation through time)


@pytest.mark.parametrize("cell, num_layers", [("lstm", 2), ("gru", 1)])
def test_each_step_starts_from_the_state_the_previous_batch_ended_in(tmp_path, data_dir, cell, num_layers):
    run = build_trainer(data_dir, str(tmp_path / "save"), model=cell, num_layers=num_layers)
    model, progress = run.model, run.progress
    assert not progress.state.numpy().any()  # a run starts from the zero state
    for index in range(3):
        inputs, targets = run.loader.batch(index)
        before = progress.state.numpy()
        # The network run independently over this batch from the stored state, with the weights of the step.
        _, expected = model(tf.constant(inputs), tuple(tf.unstack(before)), training=False)
        run.train_step(inputs, targets)
        stored = progress.state.numpy()
        assert stored.shape == (model.num_states, 4, 16)
        np.testing.assert_allclose(stored, np.stack(expected), rtol=1e-5, atol=1e-6, err_msg=f"batch {index}")
        assert np.abs(stored - before).max() > 1e-3  # the premise: every batch moves the state


def test_state_is_carried_through_an_epoch_and_zero_at_the_start_of_each(tmp_path, data_dir):
    run = build_trainer(data_dir, str(tmp_path / "save"), num_epochs=2, val_frac=0)
    calls = record_steps(run)
    assert run.run() == 0
    num_batches = run.loader.num_batches
    assert len(calls) == 2 * num_batches
    for i, call in enumerate(calls):
        index = i % num_batches
        # Every batch of the epoch once, in order, and the epoch counter follows.
        np.testing.assert_array_equal(call["inputs"], run.loader.batch(index)[0], err_msg=f"step {i + 1}")
        assert call["epoch"] == i // num_batches, f"step {i + 1}"
        if index == 0:
            assert not call["state"].any(), f"step {i + 1} (first of epoch {i // num_batches}) had a non-zero state"
        else:
            np.testing.assert_array_equal(call["state"], calls[i - 1]["state_after"], err_msg=f"step {i + 1}")
            assert call["state"].any(), f"step {i + 1}"


# ----------------------------------------------------------------------------------------------------------
# Learning rate and clipped Adam


def test_optimizer_uses_the_decayed_learning_rate_of_each_epoch(tmp_path, data_dir):
    run = build_trainer(data_dir, str(tmp_path / "save"), num_epochs=3, learning_rate=0.01, decay_rate=0.5,
                        val_frac=0)
    calls = record_steps(run)
    assert run.run() == 0
    assert len(calls) == 3 * run.loader.num_batches
    for i, call in enumerate(calls):
        assert call["learning_rate"] == pytest.approx(0.01 * 0.5 ** call["epoch"], rel=1e-6), f"step {i + 1}"
    assert {call["epoch"] for call in calls} == {0, 1, 2}


def adam_first_update(gradient, learning_rate, beta_2=0.999, epsilon=1e-7):
    """The change Keras' Adam makes to a weight at its first step (moments zero): -lr * g * s / (s |g| + eps),
    s = sqrt(1 - beta_2), which is about -lr * sign(g) unless |g| is tiny."""
    s = np.sqrt(1 - beta_2)
    return -learning_rate * gradient * s / (s * np.abs(gradient) + epsilon)


@pytest.mark.parametrize("epoch, grad_clip", [
    (0, 1e9),  # no clipping: every weight with a gradient moves by about the learning rate
    (2, 1e9),  # epoch 2 moves it by learning_rate * decay_rate ** 2
    (0, 1e-4),  # clipped to a global norm of 1e-4: gradients so small that Adam's epsilon shrinks the update
])
def test_first_step_is_a_clipped_adam_update_at_the_epochs_learning_rate(tmp_path, data_dir, epoch, grad_clip):
    run = build_trainer(data_dir, str(tmp_path / "save"), num_epochs=3, learning_rate=0.01, decay_rate=0.5,
                        grad_clip=grad_clip, max_steps=1, val_frac=0)
    run.progress.epoch.assign(epoch)  # as if resumed at the start of this epoch
    model = run.model
    inputs, targets = run.loader.batch(0)
    with tf.GradientTape() as tape:
        logits, _ = model(tf.constant(inputs), model.zero_state(4), training=False)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True))
    grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, model.trainable_variables)]
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    clipped = [g * min(1.0, grad_clip / norm) for g in grads]
    learning_rate = 0.01 * 0.5 ** epoch
    expected = [adam_first_update(g, learning_rate) for g in clipped]
    before = weights_of(model)
    assert run.run() == 0
    assert int(run.progress.step) == 1
    changes = [after - b for after, b in zip(weights_of(model), before)]
    for variable, change, want in zip(model.trainable_variables, changes, expected):
        np.testing.assert_allclose(change, want, rtol=1e-3, atol=learning_rate * 1e-3, err_msg=variable.path)
    moved = np.mean(np.concatenate([np.abs(c).ravel() for c in changes]))
    unclipped = np.mean(np.concatenate([np.abs(adam_first_update(g, learning_rate)).ravel() for g in grads]))
    if grad_clip < norm:  # the premise: clipping made the update visibly smaller than an unclipped one
        assert moved < 0.5 * unclipped, (moved, unclipped)
    else:  # Adam's first step moves a weight by about the learning rate, whatever the gradient's size
        assert moved == pytest.approx(unclipped, rel=1e-3)
        assert max(np.abs(c).max() for c in changes) == pytest.approx(learning_rate, rel=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Validation, interrupt, resume with another layout


def test_validation_loss_is_the_inference_loss_over_every_held_out_token(tmp_path, data_dir, capsys):
    save = str(tmp_path / "save")
    # With dropout, so that a validation pass run in training mode would be seen.
    run = build_trainer(data_dir, save, dropout=0.5, save_every=10, max_steps=20)
    assert run.run() == 0
    val_ids = run.loader.val_ids
    inputs, targets, weights = evaluation.stream_layout(val_ids, evaluation.EVAL_STREAMS)
    assert weights.sum() == len(val_ids) - 1  # every next-token prediction of the tail, once
    model = savedir.load(save).model  # the newest checkpoint: step 20
    logits, _ = model(tf.constant(inputs), model.zero_state(inputs.shape[0]), training=False)
    losses = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True).numpy()
    expected = float(np.sum(losses.astype(np.float64) * weights)) / (len(val_ids) - 1)
    assert f"20/20 (epoch 0), val_loss = {expected:.4f}" in capsys.readouterr().out
    with open(os.path.join(save, savedir.METRICS_FILE)) as f:
        rows = [line.split(",") for line in f.read().splitlines()[1:]]
    val = {int(row[0]): float(row[3]) for row in rows if row[3]}
    assert sorted(val) == [10, 20]
    assert val[20] == pytest.approx(expected, rel=2e-5)


def test_ctrl_c_in_the_loop_before_any_step_saves_nothing(tmp_path, data_dir, monkeypatch, capsys):
    # Ctrl-C at the first step, in the training loop: no step was made, so no checkpoint of random weights.
    def interrupted_at_once(model, optimizer, progress, grad_clip, strategy=None, watch=None):
        def train_step(inputs, targets):
            raise KeyboardInterrupt
        return train_step

    monkeypatch.setattr(trainer, "make_train_step", interrupted_at_once)
    save = str(tmp_path / "save")
    assert train.main(train_flags(data_dir, save, "--max_steps", 5)) == trainer.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted: nothing new to save (no step was made)"
    assert not checkpoints.has_checkpoint(save)


def test_ctrl_c_saves_a_checkpoint_but_never_makes_it_best(tmp_path, monkeypatch, capsys):
    # Training loss far below the validation loss (a tail of characters the training text never has): were the
    # interrupt's mean training loss compared with the best validation loss, it would win.
    tail = "".join(random.Random(0).choice("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(200))
    data = make_data_dir(tmp_path / "data", TINY_TEXT + tail)
    save = str(tmp_path / "save")
    real_make_train_step = trainer.make_train_step

    def interrupted_at_step_25(model, optimizer, progress, grad_clip, strategy=None, watch=None):
        step = real_make_train_step(model, optimizer, progress, grad_clip, strategy, watch)

        def train_step(inputs, targets):
            if int(progress.step) == 25:
                raise KeyboardInterrupt
            return step(inputs, targets)
        return train_step

    monkeypatch.setattr(trainer, "make_train_step", interrupted_at_step_25)
    argv = ["--data_dir", data, "--save_dir", save, "--rnn_size", "16", "--num_layers", "1", "--batch_size", "4",
            "--seq_length", "10", "--seed", "1", "--save_every", "10", "--max_steps", "60", "--learning_rate", "0.01"]
    assert train.main(argv) == trainer.EXIT_INTERRUPTED
    assert checkpoints.checkpoint_step(tf.train.latest_checkpoint(save)) == 25
    assert f"interrupted: checkpoint written to {os.path.join(save, 'model.ckpt-25')}" in capsys.readouterr().err
    info = savedir.read_yaml(os.path.join(save, savedir.BEST_DIR, savedir.MODEL_INFO_FILE))
    assert info["step"] in (10, 20) and info["score_is"] == "val_loss", info


def test_resume_with_another_batch_layout_restarts_the_epoch_from_its_first_batch(tmp_path, data_dir, capsys):
    save = str(tmp_path / "save")
    first = build_trainer(data_dir, save, max_steps=30)
    assert first.run() == 0
    run = build_trainer(data_dir, save, batch_size=2, seq_length=7, init_from=save, max_steps=33)
    run.resume(save)
    assert "batch_size/seq_length changed: epoch 0 restarts from its first batch" in capsys.readouterr().err
    calls = record_steps(run)
    assert run.run() == 0
    assert [int(run.progress.step), int(run.progress.epoch), int(run.progress.batch_in_epoch)] == [33, 0, 3]
    for index, call in enumerate(calls):
        np.testing.assert_array_equal(call["inputs"], run.loader.batch(index)[0], err_msg=f"batch {index}")
    assert calls[0]["state"].shape == (2, 2, 16) and not calls[0]["state"].any()


def test_resume_with_another_batch_layout_after_an_epochs_last_batch_goes_on_with_the_next_epoch(tmp_path, data_dir,
                                                                                                   capsys):
    save = str(tmp_path / "save")
    epoch_end = utils.TextLoader(data_dir, TINY["batch_size"], TINY["seq_length"]).num_batches
    assert build_trainer(data_dir, save, num_epochs=3, max_steps=epoch_end).run() == 0  # the checkpoint of the epoch's last batch: epoch 0, batch num_batches of num_batches
    run = build_trainer(data_dir, save, num_epochs=3, batch_size=2, seq_length=7, init_from=save,
                        max_steps=epoch_end + 3)
    run.resume(save)
    assert "epoch 0 was finished; epoch 1 starts from its first batch" in capsys.readouterr().err
    calls = record_steps(run)
    assert run.run() == 0
    assert [int(run.progress.step), int(run.progress.epoch), int(run.progress.batch_in_epoch)] == [
        epoch_end + 3, 1, 3]
    assert [call["epoch"] for call in calls] == [1, 1, 1]  # epoch 0 is not trained again
    for index, call in enumerate(calls):
        np.testing.assert_array_equal(call["inputs"], run.loader.batch(index)[0], err_msg=f"batch {index}")
    assert not calls[0]["state"].any()


def test_resumed_run_ends_after_num_epochs_and_prints_that_total(tmp_path, data_dir, capsys):
    save = str(tmp_path / "save")
    flags = ["--data_dir", data_dir, "--save_dir", save, "--rnn_size", "16", "--num_layers", "1", "--batch_size",
             "4", "--seq_length", "10", "--seed", "1", "--num_epochs", "2", "--print_every", "20",
             "--save_every", "50"]
    total = 2 * utils.TextLoader(data_dir, 4, 10).num_batches
    assert train.main(flags + ["--max_steps", "60"]) == 0  # stops in the middle of epoch 0
    first = capsys.readouterr().out
    assert train.main(flags + ["--init_from", save]) == 0
    out = capsys.readouterr().out
    assert checkpoints.checkpoint_step(tf.train.latest_checkpoint(save)) == total
    totals = {line.split()[0].split("/")[1] for line in out.splitlines() if " (epoch " in line}
    assert totals == {str(total)}, totals  # progress and val_loss lines
    assert "50/60 (epoch 0), val_loss" in first
