"""The char-rnn network and the compiled text generator.

CharRNN: Embedding -> num_layers x (LSTM | GRU | SimpleRNN) -> Dense over the vocabulary. The recurrent state
goes in and out explicitly as a flat tuple of [batch, rnn_size] tensors (h, c per LSTM layer; h per GRU or
SimpleRNN layer), so the same weights serve a training batch and batch-1 sampling and no layer is stateful.

On a CPU, a sequence of at most UNROLL_MAX_STEPS steps (a training batch) runs unrolled: every layer's cell is
called once per time step in one graph, so layer i+1 can work on step t while layer i works on step t+1 and the two
cores both have work. The Keras layers run each layer's whole sequence before the next layer starts. The math and
the weights are the same either way; a GPU, or a longer or dynamic-length sequence, uses the layers (and cuDNN).

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

    def __init__(self, vocab_size, rnn_size=128, num_layers=3, model="lstm", embedding_size=None, dropout=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        if model not in RNN_LAYERS:
            raise ValueError(f"unknown model type {model!r}: choose one of {', '.join(RNN_LAYERS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout {dropout} is not a probability in [0, 1)")
        self.vocab_size, self.rnn_size, self.num_layers, self.cell_type = vocab_size, rnn_size, num_layers, model
        self.embedding = keras.layers.Embedding(vocab_size, embedding_size or rnn_size, name="embedding")
        # Default activations, no recurrent dropout, no unrolling: the layers stay eligible for cuDNN.
        self.rnn_layers = [RNN_LAYERS[model](rnn_size, return_sequences=True, return_state=True,
                                             name=f"{model}_{i}") for i in range(num_layers)]
        # `dropout` is the probability of dropping a unit (TF1's keep_prob confusion is not repeated).
        self.dropouts = [keras.layers.Dropout(dropout, name=f"dropout_{i}") for i in range(num_layers)]
        self.head = keras.layers.Dense(vocab_size, name="head")
        # tf.train.Checkpoint does not see into Keras' tracked lists: give every layer its own attribute.
        for i, (layer, dropout_layer) in enumerate(zip(self.rnn_layers, self.dropouts)):
            setattr(self, f"rnn_{i}", layer)
            setattr(self, f"dropout_{i}", dropout_layer)
        self.states_per_layer = STATES_PER_LAYER[model]

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

    def call(self, inputs, states, training=False):
        """inputs [batch, time] int ids, states a flat tuple -> (logits [batch, time, vocab], new states)."""
        steps = inputs.shape[1]
        if steps is not None and steps <= UNROLL_MAX_STEPS and not has_gpu():
            x, new_states = self._unrolled(inputs, states, training)
        else:
            x = self.embedding(inputs)
            new_states = []
            for i, layer in enumerate(self.rnn_layers):
                x, *layer_states = layer(x, initial_state=self._layer_states(states, i), training=training)
                new_states.extend(layer_states)
                x = self.dropouts[i](x, training=training)
        return self.head(x), tuple(new_states)

    def _unrolled(self, inputs, states, training):
        """The layers over a static-length sequence, one cell call per layer and step (see the module doc)."""
        batch, steps = inputs.shape
        first_cell = self.rnn_layers[0].cell
        if batch is not None and self.vocab_size < batch * steps and first_cell.built:
            # A token's input projection in the first layer is its embedding row times the kernel: with fewer
            # tokens in the vocabulary than in the batch, project the whole table once and gather rows. This
            # drops a sixth of the matrix products of a training step (3 x 128 LSTM), forward and backward.
            table = self.input_projection_table()  # one gather per step: no strided [batch, time] slicing
            sequence = [tf.gather(table, ids) for ids in tf.unstack(inputs, axis=1)]
            first_step = functools.partial(FROM_PROJECTION[self.cell_type], first_cell)
        else:
            sequence = tf.unstack(self.embedding(inputs), axis=1)
            first_step = first_cell
        new_states = []
        for i, layer in enumerate(self.rnn_layers):
            step = first_step if i == 0 else layer.cell
            layer_states = self._layer_states(states, i)
            outputs = []
            for x_t in sequence:
                h, layer_states = step(x_t, layer_states, training=training)
                outputs.append(self.dropouts[i](h, training=training))
            sequence = outputs
            new_states.extend(layer_states)
        return tf.stack(sequence, axis=1), new_states

    def step(self, token_ids, states, table=None):
        """One time step for inference: token_ids [batch] -> (logits [batch, vocab], new states).

        Calls the cells directly, which skips the per-call sequence machinery of the layers. `table`, from
        input_projection_table, replaces the first layer's input product by a row lookup.
        """
        if table is None:
            x, first_cell = self.embedding(token_ids), self.rnn_layers[0].cell
        else:
            x = tf.gather(table, token_ids)
            first_cell = functools.partial(FROM_PROJECTION[self.cell_type], self.rnn_layers[0].cell)
        new_states = []
        for i, layer in enumerate(self.rnn_layers):
            cell = first_cell if i == 0 else layer.cell
            x, layer_states = cell(x, self._layer_states(states, i), training=False)
            new_states.extend(layer_states if isinstance(layer_states, (list, tuple)) else [layer_states])
        return self.head(x), tuple(new_states)

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


# The Keras cells' own arithmetic (LSTMCell, GRUCell with reset_after, SimpleRNNCell; implementation 2), starting
# from `projected` = inputs @ kernel, for the first layer of an unrolled sequence (CharRNN._unrolled).
def lstm_from_projection(cell, projected, states, training=False):
    h, c = states
    z = projected + tf.matmul(h, cell.recurrent_kernel.value) + cell.bias.value
    z_i, z_f, z_c, z_o = tf.split(z, 4, axis=-1)
    c = cell.recurrent_activation(z_f) * c + cell.recurrent_activation(z_i) * cell.activation(z_c)
    h = cell.recurrent_activation(z_o) * cell.activation(c)
    return h, [h, c]


def gru_from_projection(cell, projected, states, training=False):
    h_previous = states[0]
    input_bias, recurrent_bias = cell.bias.value[0], cell.bias.value[1]
    x_z, x_r, x_h = tf.split(projected + input_bias, 3, axis=-1)
    inner = tf.matmul(h_previous, cell.recurrent_kernel.value) + recurrent_bias
    recurrent_z, recurrent_r, recurrent_h = tf.split(inner, 3, axis=-1)
    z = cell.recurrent_activation(x_z + recurrent_z)
    r = cell.recurrent_activation(x_r + recurrent_r)
    candidate = cell.activation(x_h + r * recurrent_h)
    h = z * h_previous + (1 - z) * candidate
    return h, [h]


def rnn_from_projection(cell, projected, states, training=False):
    h = cell.activation(projected + cell.bias.value + tf.matmul(states[0], cell.recurrent_kernel.value))
    return h, [h]


FROM_PROJECTION = {"lstm": lstm_from_projection, "gru": gru_from_projection, "rnn": rnn_from_projection}


def keep_top_k(logits, top_k):
    """Mask all but the top_k largest logits to -inf (all kept when top_k is 0)."""
    def masked():
        k = tf.minimum(top_k, tf.shape(logits)[0])
        kth_largest = tf.gather(tf.sort(logits, direction="DESCENDING"), k - 1)
        return tf.where(logits < kth_largest, tf.constant(-float("inf"), logits.dtype), logits)
    return tf.cond(top_k > 0, masked, lambda: logits)


def choose_next(logits, previous, step_seed, temperature, mode, top_k, space_id):
    """Pick the next token id from logits [vocab] (see Generator.generate for the arguments)."""
    scaled = keep_top_k(logits / temperature, top_k)
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
        self._block = tf.function(self._generate_block, jit_compile=True)

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
        """Feed the prime ids (at least one), then generate n ids; returns int32 [n].

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

        _, _, _, _, blocks = tf.while_loop(lambda b, *_: b < num_blocks, body,
                                           (tf.constant(0), prime[-1], logits[0, -1], states, blocks))
        return blocks.concat()[:n]
