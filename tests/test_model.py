"""The network: dropout as a drop probability, and a clear refusal of unknown cell types."""
import numpy as np
import pytest
import tensorflow as tf

from model import CharRNN


def test_dropout_drops_in_training_only():
    net = CharRNN(20, 64, 1, "lstm", dropout=0.5)
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
        CharRNN(10, 8, 1, "transformer")
