"""The full-pass loss: every next-token prediction of a text scored once, with the state carried through it.

Used by train.py (the validation loss), evaluate.py and the bench scripts, so that they all measure alike. For
speed the tokens are cut into EVAL_STREAMS parallel streams (each starts from a zero state) and run EVAL_CHUNK
time steps per compiled call; padding at the end of the last stream has weight 0 and is not counted.
"""
import numpy as np
import tensorflow as tf
from tensorflow import keras

EVAL_STREAMS = 32  # parallel streams of a full-pass evaluation (each starts from a zero state)
EVAL_CHUNK = 256  # time steps per compiled evaluation call


def stream_layout(ids, num_streams):
    """Cut a token array into parallel streams for a full pass: every next-token prediction appears once.

    Returns (inputs, targets, weights), each [num_streams, length]; padding has weight 0.
    """
    ids = np.asarray(ids)
    count = len(ids) - 1
    num_streams = max(1, min(num_streams, count))
    length = -(-count // num_streams)
    inputs = np.zeros(num_streams * length, dtype=np.int32)
    targets = np.zeros(num_streams * length, dtype=np.int32)
    weights = np.zeros(num_streams * length, dtype=np.float32)
    inputs[:count], targets[:count], weights[:count] = ids[:-1], ids[1:], 1.0
    shape = (num_streams, length)
    return inputs.reshape(shape), targets.reshape(shape), weights.reshape(shape)


def make_eval_chunk(model):
    """A compiled full-pass chunk: (inputs, targets, weights, states) -> (summed loss, new states)."""
    @tf.function(reduce_retracing=True)
    def eval_chunk(inputs, targets, weights, states):
        logits, new_states = model(inputs, states, training=False)
        losses = keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)
        return tf.reduce_sum(tf.cast(losses, tf.float64) * tf.cast(weights, tf.float64)), new_states
    return eval_chunk


def full_pass_loss(model, ids, eval_chunk=None, num_streams=EVAL_STREAMS):
    """Mean next-token loss (nats) over every token of `ids`, state carried; returns (loss, token count).

    The tokens are cut into `num_streams` parallel streams for speed; 1 reads them as one sequence.
    """
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} tokens are too few to evaluate: at least 2 are needed")
    eval_chunk = eval_chunk or make_eval_chunk(model)
    inputs, targets, weights = stream_layout(ids, num_streams)
    states = model.zero_state(inputs.shape[0])
    total = 0.0
    for start in range(0, inputs.shape[1], EVAL_CHUNK):
        columns = slice(start, start + EVAL_CHUNK)
        loss_sum, states = eval_chunk(inputs[:, columns], targets[:, columns], weights[:, columns], states)
        total += float(loss_sum)
    count = len(ids) - 1
    return total / count, count
