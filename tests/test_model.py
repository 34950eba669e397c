"""The network: dropout as a drop probability, a clear refusal of unknown cell types, and its fast paths against
the Keras layers (the unrolled training pass; sampling's `step`, with every weight and bias away from zero)."""
import numpy as np
import pytest
import tensorflow as tf

import sampler
import settings
import unrolled
from model import CharRNN
from settings import ModelConfig

WEIGHT_MAGNITUDES = (0.1, 0.5)  # random weights' sizes: never zero, small enough that no gate saturates


def randomize_every_weight(net, seed):
    """Set every weight of `net`, biases included, to random values of either sign away from zero.

    Fresh models' biases are zero (LSTM forget gates one), and a bias added in the wrong place changes nothing
    while it is zero: the fast paths must be compared on weights like a trained model's."""
    rng = np.random.default_rng(seed)
    for weight in net.trainable_variables:
        magnitude = rng.uniform(*WEIGHT_MAGNITUDES, size=weight.shape)
        weight.assign(magnitude * rng.choice([-1.0, 1.0], size=weight.shape))


def test_dropout_drops_in_training_only():
    net = CharRNN(ModelConfig(20, "lstm", 64, 1, dropout=0.5))
    net.build_weights()
    inputs = tf.constant([[1, 2, 3, 4]])
    first, _ = net(inputs, net.zero_state(1), training=False)
    second, _ = net(inputs, net.zero_state(1), training=False)
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    dropped = net.dropouts[0](tf.ones([1000, 64]), training=True).numpy()
    # 0.5 is the probability of dropping: about half the units are zero (not 95%, the original's bug).
    assert 0.45 < (dropped == 0).mean() < 0.55


def test_unknown_cell_type_is_refused_by_name():
    with pytest.raises(ValueError, match="'transformer'"):
        CharRNN(ModelConfig(10, "transformer", 8, 1))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("vocab_size", [20, 40])  # fewer tokens than the batch's 21 (gathered products), more
def test_unrolled_training_pass_computes_what_the_layers_compute(cell, vocab_size, monkeypatch):
    net = CharRNN(ModelConfig(vocab_size, cell, 16, 2))
    net.build_weights()
    ids = tf.constant(np.random.default_rng(0).integers(0, vocab_size, size=(3, 8)), tf.int32)
    states = tuple(tf.random.stateless_normal([3, 16], seed=[i, 0]) for i in range(net.num_states))

    def loss_of(logits):
        return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(ids[:, 1:], logits, from_logits=True))

    @tf.function
    def unrolled_call():  # inference: the unrolled pass with autodiff through the weights
        with tf.GradientTape() as tape:
            logits, new_states = net(ids[:, :-1], states, training=True)
            loss = loss_of(logits)
        return logits, new_states, tape.gradient(loss, net.trainable_variables)

    @tf.function
    def training_pass():  # a training step: recurrent weights' gradients deferred
        with tf.GradientTape() as tape:
            logits, new_states, deferred = unrolled.training_pass(net, ids[:, :-1], states, tape)
            loss = loss_of(logits)
        assert deferred is not None
        return logits, new_states, deferred.gradients(loss)

    results = {"unrolled call": unrolled_call(), "training pass": training_pass()}
    monkeypatch.setattr(unrolled, "UNROLL_MAX_STEPS", 0)  # every sequence through the Keras layers
    layers = unrolled_call.python_function()
    flat = lambda result: [result[0], *result[1], *map(tf.convert_to_tensor, result[2])]
    expected = flat(layers)
    assert len(expected) == 1 + net.num_states + len(net.trainable_variables)
    for name, result in results.items():
        for ours, theirs in zip(flat(result), expected, strict=True):
            np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("vocab_size", [10, sampler.GENERATE_BLOCK + 1])  # row lookups in the first layer, products
def test_compiled_greedy_generation_follows_the_network(cell, vocab_size):
    tf.keras.utils.set_random_seed(1)
    net = CharRNN(ModelConfig(vocab_size, cell, 16, 2))
    net.build_weights()
    randomize_every_weight(net, seed=vocab_size)  # biases too; and larger weights, so that argmax varies
    prime = [1, 2, 3]
    generator = sampler.Generator(net)
    generated = generator.generate(tf.constant(prime), 12, 1.0, settings.MODE_ARGMAX, 0, 0, 1.0, 0.0, 0.0).numpy()
    ids = list(prime)
    for _ in range(12):
        logits, _ = net(tf.constant([ids]), net.zero_state(1))
        ids.append(int(tf.argmax(logits[0, -1])))
    assert generated.tolist() == ids[len(prime):]
    assert len(set(ids)) > 2  # not a constant sequence that any network would give


@pytest.mark.parametrize("steps", [8, unrolled.UNROLL_MAX_STEPS + 1])  # unrolled cell steps (CPU); the Keras layers
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_the_network_drops_units_of_its_output_in_training_passes_only(cell, steps):
    net = CharRNN(ModelConfig(24, cell, 24, 1, dropout=0.25))
    net.build_weights()
    net.head.kernel.assign(tf.eye(24))  # logits = the layer's output after dropout
    net.head.bias.assign(tf.zeros([24]))
    ids = tf.constant(np.random.default_rng(0).integers(0, 24, size=(3, steps)), tf.int32)
    assert unrolled.applies(net, ids) == (steps <= unrolled.UNROLL_MAX_STEPS and not unrolled.has_gpu())  # both paths
    states = tuple(tf.random.stateless_normal([3, 24], seed=[i, 1]) for i in range(net.num_states))
    inference, inference_states = net(ids, states, training=False)
    inference = inference.numpy()
    again, _ = net(ids, states, training=False)
    np.testing.assert_array_equal(again.numpy(), inference)  # inference is deterministic, dropout or not
    assert (inference != 0).all()

    def assert_dropped(logits, new_states, what):
        """A quarter of the units zero (0.25 is the probability of dropping), the others scaled by 1 / (1 - 0.25);
        the carried state untouched."""
        logits = np.asarray(logits)
        dropped = logits == 0
        assert 0.15 < dropped.mean() < 0.35, (what, dropped.mean())
        np.testing.assert_allclose(logits[~dropped], inference[~dropped] / 0.75, rtol=1e-5, atol=1e-6, err_msg=what)
        for ours, theirs in zip(new_states, inference_states, strict=True):
            np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-6, err_msg=what)
        return dropped

    masks = []
    for call in range(2):
        logits, new_states = net(ids, states, training=True)
        masks.append(assert_dropped(logits, new_states, f"call {call} with training=True"))
        with tf.GradientTape() as tape:  # what a training step runs
            logits, new_states, _ = unrolled.training_pass(net, ids, states, tape)
        masks.append(assert_dropped(logits, new_states, f"training pass {call}"))
    assert all((mask != masks[0]).any() for mask in masks[1:])  # a fresh mask every pass


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_step_computes_the_layers_logits_and_states_with_non_zero_biases(cell, monkeypatch):
    net = CharRNN(ModelConfig(12, cell, 16, 2))
    net.build_weights()
    randomize_every_weight(net, seed=3)
    assert all((weight.numpy() != 0).all() for weight in net.trainable_variables)
    steps = 6
    ids = tf.constant(np.random.default_rng(1).integers(0, 12, size=(3, steps)), tf.int32)
    states = tuple(tf.random.stateless_normal([3, 16], seed=[i, 2]) for i in range(net.num_states))
    monkeypatch.setattr(unrolled, "UNROLL_MAX_STEPS", 0)  # the reference: the Keras layers themselves
    expected, expected_states = net(ids, states)
    # Sampling's step, with the first layer's input products by the kernel and from the table (small vocabularies).
    for table in (None, net.input_projection_table()):
        step_states = states
        for t in range(steps):
            logits, step_states = net.step(ids[:, t], step_states, table)
            np.testing.assert_allclose(logits.numpy(), expected[:, t].numpy(), rtol=1e-5, atol=1e-5,
                                       err_msg=f"logits of step {t}, table {table is not None}")
        for ours, theirs in zip(step_states, expected_states, strict=True):
            np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-5)
