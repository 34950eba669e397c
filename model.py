"""The char-rnn network: Embedding -> num_layers x (LSTM | GRU | SimpleRNN) -> Dense over the vocabulary.

The recurrent state goes in and out explicitly as a flat tuple of [batch, rnn_size] tensors (h, c per LSTM
layer; h per GRU or SimpleRNN layer), so the same weights serve a training batch and batch-1 sampling and no
layer is stateful. Build it from its settings: `CharRNN(settings.ModelConfig(...))`, or from a save dir's
config.yaml with savedir.build_model. On a CPU, short training batches run through unrolled.py (the same math,
faster); sampling's compiled loop (sampler.py) calls `step`.

precision (precision.py): "bfloat16" computes the recurrent layers' matrix products of `call` in bfloat16, the
weights, the carried state, the output layer and what `call` returns staying float32; `step` (sampling) is float32
whatever the precision. The weights, and so the checkpoints, are the same in either.
"""
import tensorflow as tf
from tensorflow import keras

import unrolled
from precision import BFLOAT16, FLOAT32, keras_policy

RNN_LAYERS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "rnn": keras.layers.SimpleRNN}
STATES_PER_LAYER = {"lstm": 2, "gru": 1, "rnn": 1}
STEP_TABLE_MAX_VOCAB = 128  # see CharRNN.step_table


class CharRNN(keras.Model):
    """Embedding -> stacked recurrent layers -> Dense logits, with explicit state in and out."""

    def __init__(self, config, precision=FLOAT32, random_init=True, **kwargs):
        """config: a settings.ModelConfig (vocab_size, model, rnn_size, num_layers, embedding_size, dropout);
        precision: "float32" or "bfloat16" (see the module doc); random_init=False: the weights start as zeros, for
        a model whose weights are restored or copied next (the random values, an orthogonal matrix's QR included,
        cost a one-off sample.py's start-up for nothing)."""
        super().__init__(**kwargs)
        self.model_config, self.precision = config, precision
        self.product_dtype = tf.bfloat16 if precision == BFLOAT16 else tf.float32  # of the recurrent products
        self.vocab_size, self.rnn_size, self.num_layers = config.vocab_size, config.rnn_size, config.num_layers
        self.cell_type = config.model
        zeros = {} if random_init else {"kernel_initializer": "zeros", "bias_initializer": "zeros"}
        self.embedding = keras.layers.Embedding(config.vocab_size, config.embedding_size, name="embedding",
                                                **({} if random_init else {"embeddings_initializer": "zeros"}))
        # Default activations, no recurrent dropout, no unrolling: the layers stay eligible for cuDNN.
        self.rnn_layers = [RNN_LAYERS[config.model](config.rnn_size, return_sequences=True, return_state=True,
                                                    dtype=keras_policy(precision), name=f"{config.model}_{i}",
                                                    **zeros, **({} if random_init else
                                                                {"recurrent_initializer": "zeros"}))
                           for i in range(config.num_layers)]
        # `dropout` is the probability of dropping a unit (TF1's keep_prob confusion is not repeated).
        self.dropouts = [keras.layers.Dropout(config.dropout, name=f"dropout_{i}") for i in range(config.num_layers)]
        self.head = keras.layers.Dense(config.vocab_size, name="head", **zeros)
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

    def layer_states(self, states, i):
        """Layer i's part of the flat state tuple: [h, c] (LSTM) or [h]."""
        k = self.states_per_layer
        return list(states[i * k:(i + 1) * k])

    def call(self, inputs, states, training=False, rows=None):
        """inputs [batch, time] int ids, states a flat tuple -> (logits [batch, time, vocab], new states).

        rows: for one replica's share of a batch, (its first row, the batch's rows); see unrolled.dropout."""
        if unrolled.applies(self, inputs):  # a short static sequence on a CPU: the same math, faster
            x, new_states = unrolled.forward(self, inputs, states, training, rows=rows)
        else:
            x = self.embedding(inputs)  # (B, T, embedding_size)
            new_states = []
            for i, layer in enumerate(self.rnn_layers):
                x, *layer_states = layer(x, initial_state=self.layer_states(states, i), training=training)
                x = tf.cast(x, tf.float32)  # from bfloat16 under the mixed policy: dropout and the head in float32
                new_states.extend(tf.cast(state, tf.float32) for state in layer_states)
                x = unrolled.dropout(self.dropouts[i], x, training, rows)  # (B, T, rnn_size)
        return self.head(x), tuple(new_states)

    def call_tracking(self, inputs, states, layer):
        """For analysis (inference only): inputs [batch, time] (a static time) from `states` -> (logits [batch,
        time, vocab], new states, layer `layer`'s state after every position [batch, time, rnn_size]: the cell
        state c of an LSTM, the hidden state h of a GRU or SimpleRNN). The cells' arithmetic of the unrolled
        training pass and of `step`, with the tracked state kept at every step."""
        x, new_states, tracked = unrolled.forward(self, inputs, states, training=False, track_layer=layer)
        return self.head(x), tuple(new_states), tracked

    def step(self, token_ids, states, table=None):
        """One time step for inference: token_ids [batch] -> (logits [batch, vocab], new states).

        Runs the cells' arithmetic (unrolled.cell_step) directly, which skips the per-call sequence machinery of
        the layers: sampling's speed.
        `table`, from input_projection_table, replaces the first layer's input product by a row lookup.
        """
        x = self.embedding(token_ids) if table is None else tf.gather(table, token_ids)
        new_states = []
        for i, layer in enumerate(self.rnn_layers):
            cell = layer.cell
            x_bias, h_bias = unrolled.split_bias(self.cell_type, cell.bias.value)
            x_product = (x if i == 0 and table is not None else tf.matmul(x, cell.kernel.value)) + x_bias
            x, layer_states = unrolled.cell_step(self.cell_type, cell, x_product, self.layer_states(states, i),
                                                 unrolled.by_weight(cell.recurrent_kernel.value), h_bias,
                                                 shared_activations=True)
            new_states.extend(layer_states)
        return self.head(x), tuple(new_states)

    def input_projection_table(self):
        """[vocab, gates]: every token's input product in the first layer (embedding row @ first kernel)."""
        return tf.matmul(self.embedding.embeddings.value, self.rnn_layers[0].cell.kernel.value)

    def step_table(self):
        """input_projection_table() for a loop of `step` calls when the vocabulary has at most STEP_TABLE_MAX_VOCAB
        tokens (a small vocabulary's products cost less once per loop than once per step), else None."""
        return self.input_projection_table() if self.vocab_size <= STEP_TABLE_MAX_VOCAB else None

    def build_weights(self):
        """Create every weight (Keras builds lazily), layer by layer, without running the network."""
        self.embedding.build((None, None))
        width = self.embedding.output_dim
        for layer in self.rnn_layers:  # the unrolled path calls only their cells
            layer.build((None, None, width))
            width = self.rnn_size
        self.head.build((None, None, width))
        self.built = True
