"""The char-rnn network and the compiled text generator.

CharRNN: Embedding -> num_layers x (LSTM | GRU | SimpleRNN) -> Dense over the vocabulary. The recurrent state
goes in and out explicitly as a flat tuple of [batch, rnn_size] tensors (h, c per LSTM layer; h per GRU or
SimpleRNN layer), so the same weights serve a training batch and batch-1 sampling and no layer is stateful.

On a CPU, a sequence of at most UNROLL_MAX_STEPS steps (a training batch) runs unrolled: every layer's cell
arithmetic appears once per time step in one graph, so layer i+1 can work on step t while layer i works on step
t+1 and the two cores both have work (the Keras layers run each layer's whole sequence before the next starts).
A training step also takes the first layer's input products from a projected embedding table and computes the
recurrent weights' gradients as one product each (DeferredGradients). The math and the weights are the same
either way; a GPU, or a longer or dynamic-length sequence, uses the layers (and so cuDNN).

Generator: the whole sampling loop (prime, then n tokens) as one compiled TensorFlow function over tensors.
"""
import functools

import tensorflow as tf
from tensorflow import keras

RNN_LAYERS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "rnn": keras.layers.SimpleRNN}
STATES_PER_LAYER = {"lstm": 2, "gru": 1, "rnn": 1}
MODE_ARGMAX, MODE_SAMPLE, MODE_SAMPLE_ON_SPACES = 0, 1, 2
GENERATE_BLOCK = 128  # tokens per XLA-compiled block of the sampling loop
UNROLL_MAX_STEPS = 100  # longest static sequence run unrolled on a CPU (graph size and compile time grow with it)


@functools.cache
def has_gpu():
    return bool(tf.config.list_physical_devices("GPU"))


class CharRNN(keras.Model):
    """Embedding -> stacked recurrent layers -> Dense logits, with explicit state in and out."""

    def __init__(self, config, **kwargs):
        """config: a settings.ModelConfig (vocab_size, model, rnn_size, num_layers, embedding_size, dropout)."""
        super().__init__(**kwargs)
        self.model_config = config
        self.vocab_size, self.rnn_size, self.num_layers = config.vocab_size, config.rnn_size, config.num_layers
        self.cell_type = config.model
        self.embedding = keras.layers.Embedding(config.vocab_size, config.embedding_size, name="embedding")
        # Default activations, no recurrent dropout, no unrolling: the layers stay eligible for cuDNN.
        self.rnn_layers = [RNN_LAYERS[config.model](config.rnn_size, return_sequences=True, return_state=True,
                                                    name=f"{config.model}_{i}") for i in range(config.num_layers)]
        # `dropout` is the probability of dropping a unit (TF1's keep_prob confusion is not repeated).
        self.dropouts = [keras.layers.Dropout(config.dropout, name=f"dropout_{i}") for i in range(config.num_layers)]
        self.head = keras.layers.Dense(config.vocab_size, name="head")
        # tf.train.Checkpoint does not see into Keras' tracked lists: give every layer its own attribute.
        for i, (layer, dropout_layer) in enumerate(zip(self.rnn_layers, self.dropouts)):
            setattr(self, f"rnn_{i}", layer)
            setattr(self, f"dropout_{i}", dropout_layer)
        self.states_per_layer = STATES_PER_LAYER[config.model]

    @property
    def num_states(self):
        """How many [batch, rnn_size] tensors make up the recurrent state."""
        return self.num_layers * self.states_per_layer

    def zero_state(self, batch_size):
        """The initial state for `batch_size` rows: a tuple of zero tensors."""
        return tuple(tf.zeros([batch_size, self.rnn_size]) for _ in range(self.num_states))

    def _layer_states(self, states, i):
        k = self.states_per_layer
        return list(states[i * k:(i + 1) * k])

    def unrolls(self, inputs):
        """Whether a batch of this shape runs unrolled (see the module doc)."""
        steps = inputs.shape[1]
        return steps is not None and steps <= UNROLL_MAX_STEPS and not has_gpu()

    def call(self, inputs, states, training=False):
        """inputs [batch, time] int ids, states a flat tuple -> (logits [batch, time, vocab], new states)."""
        if self.unrolls(inputs):
            x, new_states = self._unrolled(inputs, states, training)
        else:
            x = self.embedding(inputs)
            new_states = []
            for i, layer in enumerate(self.rnn_layers):
                x, *layer_states = layer(x, initial_state=self._layer_states(states, i), training=training)
                new_states.extend(layer_states)
                x = self.dropouts[i](x, training=training)
        return self.head(x), tuple(new_states)

    def training_pass(self, inputs, states, tape):
        """The forward pass of a training step, recorded on `tape`: (logits, new states, deferred).

        `deferred` is a DeferredGradients when the batch runs unrolled (then ask it for the gradients), else None
        (then ask the tape).
        """
        if not self.unrolls(inputs):
            return (*self(inputs, states, training=True), None)
        deferred = DeferredGradients(self, tape)
        x, new_states = self._unrolled(inputs, states, True, deferred)
        return self.head(x), tuple(new_states), deferred

    def _unrolled(self, inputs, states, training, deferred=None):
        """The layers over a static-length sequence, one cell step per layer and time step (see the module doc)."""
        batch, steps = inputs.shape
        read = (lambda variable: tf.stop_gradient(variable.value)) if deferred else (lambda variable: variable.value)
        # A token's input product in the first layer is its embedding row times the kernel: with fewer tokens in
        # the vocabulary than in the batch, multiply the whole table once and gather rows. This drops a sixth of
        # the matrix products of a training step (3 x 128 LSTM), forward and backward.
        gathered = batch is not None and self.vocab_size < batch * steps
        if gathered:
            table = tf.matmul(read(self.embedding.embeddings), read(self.rnn_layers[0].cell.kernel))
            step_ids = tf.unstack(inputs, axis=1)  # one gather per step: no strided [batch, time] slicing
            sequence = [tf.gather(table, ids) for ids in step_ids]
            if deferred:
                deferred.step_ids = step_ids
        else:
            sequence = tf.unstack(self.embedding(inputs), axis=1)
        new_states = []
        for i, layer in enumerate(self.rnn_layers):
            cell = layer.cell
            kernel, recurrent_kernel = read(cell.kernel), read(cell.recurrent_kernel)
            by = by_constant_weight if deferred else by_weight
            multiply_kernel, multiply_recurrent = by(kernel), by(recurrent_kernel)
            biases = split_bias(self.cell_type, read(cell.bias))
            layer_states = self._layer_states(states, i)
            outputs = []
            for x in sequence:
                h_previous = layer_states[0]
                x_bias, h_bias = deferred.record(i, x, h_previous, *biases) if deferred else biases
                x_product = (x if i == 0 and gathered else multiply_kernel(x)) + x_bias
                h, layer_states = self._cell_step(cell, x_product, layer_states, multiply_recurrent, h_bias)
                outputs.append(self.dropouts[i](h, training=training))
            sequence = outputs
            new_states.extend(layer_states)
        return tf.stack(sequence, axis=1), new_states

    def step(self, token_ids, states, table=None):
        """One time step for inference: token_ids [batch] -> (logits [batch, vocab], new states).

        Runs the cells' arithmetic directly, which skips the per-call sequence machinery of the layers.
        `table`, from input_projection_table, replaces the first layer's input product by a row lookup.
        """
        x = self.embedding(token_ids) if table is None else tf.gather(table, token_ids)
        new_states = []
        for i, layer in enumerate(self.rnn_layers):
            cell = layer.cell
            x_bias, h_bias = split_bias(self.cell_type, cell.bias.value)
            x_product = (x if i == 0 and table is not None else tf.matmul(x, cell.kernel.value)) + x_bias
            x, layer_states = self._cell_step(cell, x_product, self._layer_states(states, i),
                                              by_weight(cell.recurrent_kernel.value), h_bias)
            new_states.extend(layer_states)
        return self.head(x), tuple(new_states)

    def _cell_step(self, cell, x_product, layer_states, multiply_recurrent, h_bias):
        """One step of one layer from its input product (input bias included): (output, new layer states)."""
        h_product = multiply_recurrent(layer_states[0])
        if h_bias is not None:
            h_product += h_bias
        return GATES[self.cell_type](cell, x_product, h_product, layer_states)

    def input_projection_table(self):
        """[vocab, gates]: every token's input product in the first layer (embedding row @ first kernel)."""
        return tf.matmul(self.embedding.embeddings.value, self.rnn_layers[0].cell.kernel.value)

    def build_weights(self):
        """Create every weight (Keras builds lazily) by running one tiny batch."""
        width = self.embedding.output_dim
        for layer in self.rnn_layers:  # the unrolled path calls only their cells
            layer.build((1, 1, width))
            width = self.rnn_size
        self(tf.zeros([1, 1], tf.int32), self.zero_state(1))


# The Keras cells' arithmetic (LSTMCell, GRUCell with reset_after, SimpleRNNCell; implementation 2) from the two
# matrix products of a step: x_product = inputs @ kernel + input bias, h_product = h @ recurrent_kernel (plus the
# recurrent bias, GRU). The unrolled sequence and sampling call these instead of the cells.
def lstm_gates(cell, x_product, h_product, states):
    z_i, z_f, z_c, z_o = tf.split(x_product + h_product, 4, axis=-1)
    c = cell.recurrent_activation(z_f) * states[1] + cell.recurrent_activation(z_i) * cell.activation(z_c)
    h = cell.recurrent_activation(z_o) * cell.activation(c)
    return h, [h, c]


def gru_gates(cell, x_product, h_product, states):
    x_z, x_r, x_h = tf.split(x_product, 3, axis=-1)
    recurrent_z, recurrent_r, recurrent_h = tf.split(h_product, 3, axis=-1)
    z = cell.recurrent_activation(x_z + recurrent_z)
    r = cell.recurrent_activation(x_r + recurrent_r)
    candidate = cell.activation(x_h + r * recurrent_h)
    h = z * states[0] + (1 - z) * candidate
    return h, [h]


def rnn_gates(cell, x_product, h_product, states):
    h = cell.activation(x_product + h_product)
    return h, [h]


GATES = {"lstm": lstm_gates, "gru": gru_gates, "rnn": rnn_gates}


def by_weight(weight):
    """x -> x @ weight."""
    return lambda x: tf.matmul(x, weight)


def by_constant_weight(weight):
    """x -> x @ weight for a weight with no gradient of its own, whose backward product for x uses a transposed
    copy made once: oneDNN multiplies [batch, 4 x units] by a transposed [units, 4 x units] operand 1.4x slower."""
    # Two halves transposed and joined: Grappler would fold a plain transpose back into the product's flag.
    half = weight.shape[0] // 2
    transposed = tf.concat([tf.transpose(weight[:half]), tf.transpose(weight[half:])], 1)

    @tf.custom_gradient
    def product(x):
        return tf.matmul(x, weight), lambda upstream: tf.matmul(upstream, transposed)
    return product


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
        model = self.model
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
            by_variable[id(cell.recurrent_kernel)] = tf.matmul(previous, d_h, transpose_a=True)
            d_bias = tf.reduce_sum(d_x, 0)
            by_variable[id(cell.bias)] = d_bias if shared else tf.stack([d_bias, tf.reduce_sum(d_h, 0)])
            if i == 0 and self.step_ids is not None:
                d_table = tf.math.unsorted_segment_sum(d_x, tf.concat(self.step_ids, 0), model.vocab_size)
                embeddings, kernel = model.embedding.embeddings.value, cell.kernel.value
                by_variable[id(cell.kernel)] = tf.matmul(embeddings, d_table, transpose_a=True)
                by_variable[id(model.embedding.embeddings)] = tf.matmul(d_table, kernel, transpose_b=True)
            else:
                by_variable[id(cell.kernel)] = tf.matmul(tf.concat(layer["inputs"], 0), d_x, transpose_a=True)
        return [by_variable[id(v)] for v in model.trainable_variables]


def keep_top_k(logits, top_k):
    """Mask all but the top_k largest logits to -inf (all kept when top_k is 0)."""
    def masked():
        k = tf.minimum(top_k, tf.shape(logits)[0])
        kth_largest = tf.gather(tf.sort(logits, direction="DESCENDING"), k - 1)
        return tf.where(logits < kth_largest, tf.constant(-float("inf"), logits.dtype), logits)
    return tf.cond(top_k > 0, masked, lambda: logits)


def choose_next(logits, previous, step_seed, temperature, mode, top_k, space_id):
    """Pick the next token id from logits [vocab] (see Generator.generate for the arguments)."""
    # The largest logit is subtracted first, so that a tiny temperature cannot overflow to inf - inf = NaN.
    scaled = keep_top_k((logits - tf.reduce_max(logits)) / temperature, top_k)
    # Inverse CDF: one uniform draw u in [0, total) and the first token whose cumulative weight exceeds it; a
    # token of weight 0 (masked by top_k) is never chosen. Unlike stateless_categorical it compiles with XLA
    # on the CPU. The index is capped at the last token of positive weight, should rounding make u reach the
    # total: never one past the vocabulary, as the original's weighted_pick could be.
    weights = tf.exp(scaled - tf.reduce_max(scaled))
    cumulative = tf.cumsum(weights)
    u = tf.random.stateless_uniform([], seed=step_seed) * cumulative[-1]
    last_possible = tf.reduce_max(tf.where(weights > 0, tf.range(tf.shape(weights)[0]), 0))
    sampled = tf.minimum(tf.reduce_sum(tf.cast(cumulative <= u, tf.int32)), last_possible)
    greedy = tf.argmax(logits, output_type=tf.int32)
    sample_here = tf.logical_or(tf.equal(mode, MODE_SAMPLE),
                                tf.logical_and(tf.equal(mode, MODE_SAMPLE_ON_SPACES), tf.equal(previous, space_id)))
    return tf.where(sample_here, sampled, greedy)


class Generator(tf.Module):
    """Compiled sampling over one CharRNN; holds no Python state, so one instance serves many threads.

    The token loop runs in blocks of GENERATE_BLOCK steps, each compiled by XLA into one fused program (a
    per-token graph loop spends most of its time dispatching small ops); a graph loop runs the blocks.
    """

    def __init__(self, model, space_id=-1):
        super().__init__(name="generator")
        self.model = model
        self.space_id = tf.constant(space_id, tf.int32)
        # Set by stop() from any thread; the block loop reads it before each block (one read per block).
        self.stopped = tf.Variable(False, trainable=False, name="stopped")
        self._block = tf.function(self._generate_block, jit_compile=True)

    def stop(self):
        """Make every generate() call, running or later, stop before its next block: it then returns fewer
        than n ids (those of the blocks already made). For a server that is shutting down; there is no undo."""
        self.stopped.assign(True)

    def _generate_block(self, position, previous, logits, states, temperature, mode, seed, top_k):
        """GENERATE_BLOCK more tokens from (previous token, its logits, states); returns them and the new carry."""
        tokens = tf.TensorArray(tf.int32, size=GENERATE_BLOCK)
        # A small vocabulary's first-layer input products cost less, once per block, than one product per token.
        table = self.model.input_projection_table() if self.model.vocab_size <= GENERATE_BLOCK else None

        def body(i, previous, logits, states, tokens):
            step_seed = tf.stack([seed, tf.cast(position + i, tf.int64)])
            token = choose_next(logits, previous, step_seed, temperature, mode, top_k, self.space_id)
            next_logits, next_states = self.model.step(token[tf.newaxis], states, table)
            return i + 1, token, next_logits[0], next_states, tokens.write(i, token)

        _, previous, logits, states, tokens = tf.while_loop(
            lambda i, *_: i < GENERATE_BLOCK, body, (tf.constant(0), previous, logits, states, tokens))
        return tokens.stack(), previous, logits, states

    @tf.function(input_signature=[
        tf.TensorSpec([None], tf.int32, name="prime"),
        tf.TensorSpec([], tf.int32, name="n"),
        tf.TensorSpec([], tf.float32, name="temperature"),
        tf.TensorSpec([], tf.int32, name="mode"),
        tf.TensorSpec([], tf.int64, name="seed"),
        tf.TensorSpec([], tf.int32, name="top_k"),
    ])
    def generate(self, prime, n, temperature, mode, seed, top_k):
        """Feed the prime ids (at least one), then generate n ids; returns int32 [n], or the ids of the blocks
        made so far (fewer than n) once stop() was called.

        mode: 0 argmax, 1 sample every step, 2 sample only right after a space. temperature divides the
        logits; top_k > 0 samples among the k likeliest tokens only; seed makes the draw repeatable.
        """
        logits, states = self.model(prime[tf.newaxis], self.model.zero_state(1))
        num_blocks = (n + GENERATE_BLOCK - 1) // GENERATE_BLOCK
        blocks = tf.TensorArray(tf.int32, size=num_blocks, element_shape=[GENERATE_BLOCK])

        def body(b, previous, logits, states, blocks):
            tokens, previous, logits, states = self._block(b * GENERATE_BLOCK, previous, logits, states,
                                                           temperature, mode, seed, top_k)
            return b + 1, previous, logits, states, blocks.write(b, tokens)

        def more(b, *_):
            return tf.logical_and(b < num_blocks, tf.logical_not(self.stopped.read_value()))

        made, _, _, _, blocks = tf.while_loop(more, body,
                                              (tf.constant(0), prime[-1], logits[0, -1], states, blocks))
        # Blocks a stop left unmade concatenate as zeros (the element shape is fixed); the slice drops them.
        return blocks.concat()[:tf.minimum(n, made * GENERATE_BLOCK)]
