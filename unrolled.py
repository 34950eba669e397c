"""The CPU training fast path: the recurrent layers unrolled step by step, with deferred weight gradients.

Why: the Keras layers run each layer's whole sequence before the next layer starts, so on a CPU one core waits.
Unrolled, every layer's cell arithmetic appears once per time step in one graph, and layer i+1 works on step t
while layer i works on step t+1. A training step also takes the first layer's input products from a projected
embedding table (fewer matrix products when the vocabulary is smaller than the batch), computes each recurrent
weight's gradient as one large product (DeferredGradients), and multiplies by a transposed copy of each weight in
the backward pass (by_constant_weight). Each was measured on a 2-core machine at the same losses
(docs/performance.md, "Where the training time goes": for the LSTM, unrolling 1.22x the tokens/s, the gathered
first-layer products 1.12x, deferred gradients 1.10x, the transposed copies 1.08x). tests/test_model.py checks it
against the layers.

The math and the weights are the Keras layers' (LSTMCell, GRUCell with reset_after, SimpleRNNCell); a GPU, or a
longer or dynamic-length sequence, uses the layers (and so cuDNN). The trainer calls loss_and_gradients, whatever
path it takes; sampling's CharRNN.step uses the cells' arithmetic below too.

In bfloat16 (model.product_dtype, see precision.py) every matrix product of the recurrent layers, forward and
backward, takes bfloat16 operands (each weight cast once per pass) and gives a float32 result: the gate arithmetic,
the carried state, the gradients and the weights stay float32.
"""
import functools

import tensorflow as tf
from tensorflow import keras

UNROLL_MAX_STEPS = 100  # longest static sequence run unrolled on a CPU (graph size and compile time grow with it)


@functools.cache
def has_gpu():
    return bool(tf.config.list_physical_devices("GPU"))


def product(a, b, dtype=tf.float32, **options):
    """tf.matmul(a, b, **options) with operands in `dtype` and a float32 result (float32: the plain product)."""
    if dtype == tf.float32:
        return tf.matmul(a, b, **options)
    return tf.cast(tf.matmul(tf.cast(a, dtype), tf.cast(b, dtype), **options), tf.float32)


def applies(model, inputs):
    """Whether a batch of this shape runs unrolled (see the module doc)."""
    steps = inputs.shape[1]
    return steps is not None and steps <= UNROLL_MAX_STEPS and not has_gpu()


def loss_and_gradients(model, inputs, targets, states, rows=None):
    """One training batch from `states`: (mean next-token loss, gradients of model.trainable_variables in order,
    new states). Unrolled with deferred gradients where that applies, else the Keras layers and the tape.

    rows: for one replica's share of a larger batch, (its first row, the whole batch's rows): see `dropout`.
    """
    with tf.GradientTape() as tape:
        logits, new_states, deferred = training_pass(model, inputs, states, tape, rows)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True))
    grads = deferred.gradients(loss) if deferred else tape.gradient(loss, model.trainable_variables)
    return loss, grads, new_states


def training_pass(model, inputs, states, tape, rows=None):
    """The forward pass of a training step, recorded on `tape`: (logits, new states, deferred).

    `deferred` is a DeferredGradients when the batch runs unrolled (then ask it for the gradients), else None
    (then ask the tape).
    """
    if not applies(model, inputs):
        return (*model(inputs, states, training=True, rows=rows), None)
    deferred = DeferredGradients(model, tape)
    x, new_states = forward(model, inputs, states, True, deferred, rows)
    return model.head(x), tuple(new_states), deferred


def forward(model, inputs, states, training, deferred=None, rows=None, track_layer=None):
    """The layers over a static-length sequence, one cell step per layer and time step (see the module doc):
    (output of the last layer [batch, time, rnn_size], new states). With `deferred`, the weights are read with
    stop_gradient and `deferred` records what their gradients need. rows: see `dropout`.
    track_layer: a layer's index, for analysis.py: a third result is then that layer's last state (the LSTM's
    cell state c, else h) after every step, [batch, time, rnn_size]."""
    batch, steps = inputs.shape
    dtype = model.product_dtype
    read = (lambda variable: tf.stop_gradient(variable.value)) if deferred else (lambda variable: variable.value)
    # A token's input product in the first layer is its embedding row times the kernel: with fewer tokens in
    # the vocabulary than in the batch, multiply the whole table once and gather rows. This drops a sixth of
    # the matrix products of a training step (3 x 128 LSTM), forward and backward.
    gathered = batch is not None and model.vocab_size < batch * steps
    if gathered:
        table = product(read(model.embedding.embeddings), read(model.rnn_layers[0].cell.kernel), dtype)
        step_ids = tf.unstack(inputs, axis=1)  # one gather per step: no strided [batch, time] slicing
        sequence = [tf.gather(table, ids) for ids in step_ids]
        if deferred:
            deferred.step_ids = step_ids
    else:
        sequence = tf.unstack(model.embedding(inputs), axis=1)
    new_states = []
    for i, layer in enumerate(model.rnn_layers):
        cell = layer.cell
        kernel, recurrent_kernel = read(cell.kernel), read(cell.recurrent_kernel)
        by = by_constant_weight if deferred else by_weight
        multiply_kernel, multiply_recurrent = by(kernel, dtype), by(recurrent_kernel, dtype)
        biases = split_bias(model.cell_type, read(cell.bias))
        layer_states = model.layer_states(states, i)
        outputs, tracked_states = [], []
        for x in sequence:
            h_previous = layer_states[0]
            x_bias, h_bias = deferred.record(i, x, h_previous, *biases) if deferred else biases
            x_product = (x if i == 0 and gathered else multiply_kernel(x)) + x_bias
            h, layer_states = cell_step(model.cell_type, cell, x_product, layer_states, multiply_recurrent, h_bias)
            outputs.append(dropout(model.dropouts[i], h, training, rows))
            if i == track_layer:
                tracked_states.append(layer_states[-1])
        sequence = outputs
        new_states.extend(layer_states)
        if i == track_layer:
            tracked = tf.stack(tracked_states, axis=1)
    if track_layer is not None:
        return tf.stack(sequence, axis=1), new_states, tracked
    return tf.stack(sequence, axis=1), new_states


def dropout(layer, x, training, rows=None):
    """layer(x, training): Keras' Dropout. With rows = (first row, rows of the whole batch), x is one replica's
    share of a batch split between replicas: the mask is drawn for the whole batch, from the same seed, and x
    gets its rows of it, so that every replica together drops exactly what one device would have dropped."""
    if rows is None or not training or not layer.rate:
        return layer(x, training=training)
    first, total = rows
    # Keras' Dropout is backend.random.dropout(x) = x / (1 - rate) * keep; the mask of ones is 1 / (1 - rate) * keep.
    mask = keras.random.dropout(tf.ones([total, *x.shape[1:]]), layer.rate, seed=layer.seed_generator)
    return x * mask[first:first + x.shape[0]]


def cell_step(cell_type, cell, x_product, layer_states, multiply_recurrent, h_bias, shared_activations=False):
    """One step of one layer from its input product (input bias included): (output, new layer states).
    shared_activations: see the gates below (sampling's step, which XLA compiles)."""
    h_product = multiply_recurrent(layer_states[0])
    if h_bias is not None:
        h_product += h_bias
    return GATES[cell_type](cell, x_product, h_product, layer_states, shared_activations)


# The Keras cells' arithmetic (LSTMCell, GRUCell with reset_after, SimpleRNNCell; implementation 2) from the two
# matrix products of a step: x_product = inputs @ kernel + input bias, h_product = h @ recurrent_kernel (plus the
# recurrent bias, GRU). The unrolled sequence and sampling call these instead of the cells.
# shared_activations: one sigmoid op over all of a step's gates (elementwise, so the same numbers as one op a gate),
# for sampling's compiled step: XLA lowers each sigmoid and tanh op on its own, at about 4 ms apiece, which a one-off
# sample.py waits for. Training keeps one op a gate: its backward pass would pay for the LSTM's unused quarter
# (0.90x the tokens/s at 3 x 128) and for joining the split gradients.
def lstm_gates(cell, x_product, h_product, states, shared_activations=False):
    z = x_product + h_product
    z_i, z_f, z_c, z_o = tf.split(z, 4, axis=-1)
    if shared_activations:
        i, f, _, o = tf.split(cell.recurrent_activation(z), 4, axis=-1)  # the candidate's quarter is not used
    else:
        i, f, o = (cell.recurrent_activation(gate) for gate in (z_i, z_f, z_o))
    c = f * states[1] + i * cell.activation(z_c)
    h = o * cell.activation(c)
    return h, [h, c]


def gru_gates(cell, x_product, h_product, states, shared_activations=False):
    x_z, x_r, x_h = tf.split(x_product, 3, axis=-1)
    recurrent_z, recurrent_r, recurrent_h = tf.split(h_product, 3, axis=-1)
    if shared_activations:
        z, r = tf.split(cell.recurrent_activation(tf.concat([x_z + recurrent_z, x_r + recurrent_r], axis=-1)), 2,
                        axis=-1)
    else:
        z = cell.recurrent_activation(x_z + recurrent_z)
        r = cell.recurrent_activation(x_r + recurrent_r)
    candidate = cell.activation(x_h + r * recurrent_h)
    h = z * states[0] + (1 - z) * candidate
    return h, [h]


def rnn_gates(cell, x_product, h_product, states, shared_activations=False):
    h = cell.activation(x_product + h_product)
    return h, [h]


GATES = {"lstm": lstm_gates, "gru": gru_gates, "rnn": rnn_gates}


def by_weight(weight, dtype=tf.float32):
    """x -> x @ weight, computed in `dtype` (see `product`; the weight cast once)."""
    weight = tf.cast(weight, dtype)
    return lambda x: product(x, weight, dtype)


def by_constant_weight(weight, dtype=tf.float32):
    """x -> x @ weight for a weight with no gradient of its own, whose backward product for x uses a transposed
    copy made once: oneDNN multiplies [batch, 4 x units] by a transposed [units, 4 x units] operand 1.4x slower.
    Both products computed in `dtype` (see `product`)."""
    # Two halves transposed and joined: Grappler would fold a plain transpose back into the product's flag.
    weight = tf.cast(weight, dtype)
    half = weight.shape[0] // 2
    transposed = tf.concat([tf.transpose(weight[:half]), tf.transpose(weight[half:])], 1)

    @tf.custom_gradient
    def multiply(x):
        return product(x, weight, dtype), lambda upstream: product(upstream, transposed, dtype)
    return multiply


def split_bias(cell_type, bias):
    """(input bias, recurrent bias or None): a GRU keeps both in one [2, 3 x units] variable."""
    return (bias[0], bias[1]) if cell_type == "gru" else (bias, None)


class DeferredGradients:
    """The recurrent weights' gradients of an unrolled training pass, each as one large product.

    Autodiff of the unrolled pass would multiply every step's inputs by its output gradient: hundreds of small
    products, summed at the end. The pass reads the weights with stop_gradient instead and adds a zero "probe" to
    each step's products; the tape gives the gradient at each probe, which is the gradient of the product, and
    gradients() multiplies the whole sequence's inputs by those at once. Same sums, a tenth more tokens/s.
    """

    def __init__(self, model, tape):
        self.model, self.tape = model, tape
        self.step_ids = None  # set when the first layer gathers its input products from the table
        self.layers = [{"inputs": [], "previous": [], "x_probes": [], "h_probes": []} for _ in model.rnn_layers]

    def record(self, i, x, h_previous, x_bias, h_bias):
        """Keep step inputs of layer i; returns the biases with probes added."""
        layer = self.layers[i]
        layer["inputs"].append(x)
        layer["previous"].append(h_previous)
        width = self.model.rnn_layers[i].cell.recurrent_kernel.shape[1]
        x_probe = tf.zeros([tf.shape(h_previous)[0], width])
        self.tape.watch(x_probe)
        layer["x_probes"].append(x_probe)
        if h_bias is None:  # the products are summed straight away: one probe serves both
            layer["h_probes"].append(x_probe)
            return x_bias + x_probe, None
        h_probe = tf.zeros_like(x_probe)
        self.tape.watch(h_probe)
        layer["h_probes"].append(h_probe)
        return x_bias + x_probe, h_bias + h_probe

    def gradients(self, loss):
        """The gradients of `loss` for model.trainable_variables, in that order."""
        model, dtype = self.model, self.model.product_dtype
        deferred = [v for layer in model.rnn_layers for v in (layer.cell.kernel, layer.cell.recurrent_kernel,
                                                               layer.cell.bias)]
        if self.step_ids is not None:
            deferred.append(model.embedding.embeddings)
        deferred_ids = {id(v) for v in deferred}
        others = [v for v in model.trainable_variables if id(v) not in deferred_ids]
        probes = {}
        for layer in self.layers:
            for probe in layer["x_probes"] + layer["h_probes"]:
                probes.setdefault(id(probe), probe)
        grads = self.tape.gradient(loss, others + list(probes.values()))
        by_variable = {id(v): g for v, g in zip(others, grads)}
        probe_grads = dict(zip(probes, grads[len(others):]))
        for i, (rnn_layer, layer) in enumerate(zip(model.rnn_layers, self.layers)):
            cell = rnn_layer.cell
            d_x = tf.concat([probe_grads[id(p)] for p in layer["x_probes"]], 0)  # [time x batch, width]
            shared = layer["h_probes"][0] is layer["x_probes"][0]
            d_h = d_x if shared else tf.concat([probe_grads[id(p)] for p in layer["h_probes"]], 0)
            previous = tf.concat(layer["previous"], 0)
            by_variable[id(cell.recurrent_kernel)] = product(previous, d_h, dtype, transpose_a=True)
            d_bias = tf.reduce_sum(d_x, 0)
            by_variable[id(cell.bias)] = d_bias if shared else tf.stack([d_bias, tf.reduce_sum(d_h, 0)])
            if i == 0 and self.step_ids is not None:
                d_table = tf.math.unsorted_segment_sum(d_x, tf.concat(self.step_ids, 0), model.vocab_size)
                embeddings, kernel = model.embedding.embeddings.value, cell.kernel.value
                by_variable[id(cell.kernel)] = product(embeddings, d_table, dtype, transpose_a=True)
                by_variable[id(model.embedding.embeddings)] = product(d_table, kernel, dtype, transpose_b=True)
            else:
                by_variable[id(cell.kernel)] = product(tf.concat(layer["inputs"], 0), d_x, dtype, transpose_a=True)
        return [by_variable[id(v)] for v in model.trainable_variables]
