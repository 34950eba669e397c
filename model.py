"""The char-rnn network and the compiled text generator.

CharRNN: Embedding -> num_layers x (LSTM | GRU | SimpleRNN) -> Dense over the vocabulary. The recurrent state
goes in and out explicitly as a flat tuple of [batch, rnn_size] tensors (h, c per LSTM layer; h per GRU or
SimpleRNN layer), so the same weights serve a training batch and batch-1 sampling and no layer is stateful.

Generator: the whole sampling loop (prime, then n tokens) as one compiled TensorFlow function over tensors.
"""
import tensorflow as tf
from tensorflow import keras

RNN_LAYERS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "rnn": keras.layers.SimpleRNN}
STATES_PER_LAYER = {"lstm": 2, "gru": 1, "rnn": 1}
MODE_ARGMAX, MODE_SAMPLE, MODE_SAMPLE_ON_SPACES = 0, 1, 2
GENERATE_BLOCK = 128  # tokens per XLA-compiled block of the sampling loop


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
        x = self.embedding(inputs)
        new_states = []
        for i, layer in enumerate(self.rnn_layers):
            x, *layer_states = layer(x, initial_state=self._layer_states(states, i), training=training)
            new_states.extend(layer_states)
            x = self.dropouts[i](x, training=training)
        return self.head(x), tuple(new_states)

    def step(self, token_ids, states):
        """One time step for inference: token_ids [batch] -> (logits [batch, vocab], new states).

        Calls the cells directly, which skips the per-call sequence machinery of the layers.
        """
        x = self.embedding(token_ids)
        new_states = []
        for i, layer in enumerate(self.rnn_layers):
            x, layer_states = layer.cell(x, self._layer_states(states, i), training=False)
            new_states.extend(layer_states if isinstance(layer_states, (list, tuple)) else [layer_states])
        return self.head(x), tuple(new_states)

    def build_weights(self):
        """Create every weight (Keras builds lazily) by running one tiny batch."""
        self(tf.zeros([1, 1], tf.int32), self.zero_state(1))


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

        def body(i, previous, logits, states, tokens):
            step_seed = tf.stack([seed, tf.cast(position + i, tf.int64)])
            token = choose_next(logits, previous, step_seed, temperature, mode, top_k, self.space_id)
            next_logits, next_states = self.model.step(token[tf.newaxis], states)
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
