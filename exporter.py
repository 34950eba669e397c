"""Export for deployment: `ExportedModel`, a graph that takes text and returns text with no project code (and,
unless asked for, no XLA), and `write_export`, which saves it as a SavedModel into an export dir without ever
leaving one half-written.

Inside the graph travel what sample.py does around the network: the vocabulary (a lookup table), the tokenizer
(code points, or words and line breaks as utils.tokenize splits them), CRLF read as LF unless the model keeps
CRLF, the refusal of unknown tokens (or <unk>), the empty prime's start token, the checks of every setting, the
Generator's loop of blocks (sampler.py), built without XLA unless xla=True, and the join of the tokens into text.
Signatures:
    serving_default = generate: prime and each sampling setting that reaches the generator (settings.SETTINGS
                      but logprobs, by the server's parameter names), scalars -> text, token_ids
    generate_batch: the same inputs with a leading batch dimension, one row per sample, each with its own settings
                    -> text [rows], token_ids [rows, max n] (-1 past a row's n): what TensorFlow Serving's
                    server-side batching can merge
    step: token_ids [batch], states [num_states, batch, rnn_size] -> logits [batch, vocab], states
An export dir holds the SavedModel and assets.extra/char_rnn.json (the vocabulary and settings a client of
`step` needs; it also marks the folder as an export, which --force may replace).
"""
import datetime
import json
import os
import shutil
import tempfile
import types

import tensorflow as tf

from files import current_umask
from sampler import GENERATE_BLOCK, ROW_SETTINGS, Sampler
from settings import CHECKED, MODE_SAMPLE, MODE_SAMPLE_ON_SPACES
from utils import CRLF, NEWLINE, NUM_CODE_POINTS

INFO_FILE = os.path.join("assets.extra", "char_rnn.json")
TFLITE_FILE = os.path.join("assets.extra", "step.tflite")
SAVED_MODEL_FILE = "saved_model.pb"
SIGNATURES = ("serving_default", "generate", "generate_batch", "step")
# generate's inputs: the prime, then every checked sampling setting that reaches the generator (not logprobs, which
# the export does not report), named as the server's parameters.
GENERATED = tuple(setting for setting in CHECKED if setting.dtype is not None)
GENERATE_INPUTS = [tf.TensorSpec([], tf.string, name="prime")] + [
    tf.TensorSpec([], setting.dtype, name=setting.http) for setting in GENERATED]
# generate_batch's: the same, each with a leading batch dimension (one value per row), the dimension along which
# TensorFlow Serving's batching merges requests.
GENERATE_BATCH_INPUTS = [tf.TensorSpec([None], spec.dtype, name=spec.name) for spec in GENERATE_INPUTS]
PAD_ID = -1  # generate_batch's token_ids past a row's n (its rows are as long as the longest)
MAX_UNKNOWN_SHOWN = 10  # as utils.encode_tokens: an error names at most this many unknown tokens
# Python's \s, which utils.tokenize splits words on, is every code point for which str.isspace() holds; RE2's
# \s is ASCII only, so the graph's tokenizer spells the class out.
WHITESPACE = [chr(code) for code in range(NUM_CODE_POINTS) if chr(code).isspace()]


def _re2_class(characters):
    """An RE2 character class matching exactly these characters."""
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in characters) + "]"


SEPARATOR_CLASS = _re2_class([c for c in WHITESPACE if c != NEWLINE])  # whitespace that only separates words
ENDS_IN_WHITESPACE = "(?s).*" + _re2_class(WHITESPACE)


class ExportedModel(tf.Module):
    """The graph of one restored model: generate (text in, text out), generate_batch (its rows side by side) and
    step; see the module docstring."""

    def __init__(self, loaded, xla=False):
        """loaded: a savedir.Loaded. xla: compile the generation blocks with XLA (faster; runs only where XLA
        does: TensorFlow in Python, TensorFlow Serving with --xla_cpu_compilation_enabled or on a GPU)."""
        super().__init__(name="char_rnn")
        sampler = Sampler(loaded, jit_compile=xla)
        self.xla = xla
        # A Keras 3 model offers SavedModel a default signature traced from call(inputs) alone, which CharRNN
        # (whose states are an argument) cannot trace: the model and the generator stay out of the saved object
        # tree, and their variables are saved instead (as keras.export.ExportArchive does).
        self.parts = types.SimpleNamespace(model=loaded.model, generator=sampler.generator)
        self.saved_variables = list(loaded.model.variables) + [sampler.generator.stopped]
        self.word_level, self.keep_crlf, self.start_id = sampler.word_level, sampler.keep_crlf, sampler.start_id
        self.unk_id = -1 if loaded.unk_token is None else sampler.index.get(loaded.unk_token, -1)
        self.vocabulary = tf.Variable(loaded.vocab, trainable=False, name="vocabulary")
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(loaded.vocab), tf.range(len(loaded.vocab))), -1)
        model = loaded.model
        states = tf.TensorSpec([model.num_states, None, model.rnn_size], tf.float32, name="states")
        self.step = tf.function(self._step, input_signature=[tf.TensorSpec([None], tf.int32, name="token_ids"),
                                                             states])
        self.generate_batch = tf.function(self._generate_batch, input_signature=GENERATE_BATCH_INPUTS)

    def signatures(self):
        """{name: concrete function} for tf.saved_model.save."""
        generate = self.generate.get_concrete_function()
        return {"serving_default": generate, "generate": generate,
                "generate_batch": self.generate_batch.get_concrete_function(),
                "step": self.step.get_concrete_function()}

    @tf.function(input_signature=GENERATE_INPUTS)
    def generate(self, prime, *settings):
        """What sample.py prints (without its final newline) for these settings (GENERATE_INPUTS' order): {"text":
        the prime followed by n generated tokens, "token_ids": their ids}. Sampler.run in graph form."""
        prime, values = self.checked_inputs(prime, settings)
        ids = self.encode(prime[tf.newaxis]).flat_values
        ids = tf.cond(tf.size(ids) > 0, lambda: ids, lambda: tf.constant([self.start_id]))
        generated = self.parts.generator.generate(ids, **values)
        return {"text": self.join(prime, tf.gather(self.vocabulary, generated)), "token_ids": generated}

    def _generate_batch(self, prime, *settings):
        """generate for a batch of rows (GENERATE_BATCH_INPUTS, one value of each per row): {"text": [rows],
        "token_ids": [rows, the largest n], PAD_ID past a row's n}. Each row's text is generate's for its own
        values: its prime is fed alone, it draws with its own seed at its own positions, and it is cut at its own
        n (every row runs as many steps as the longest)."""
        with tf.control_dependencies(check_rows(prime, settings)):
            prime = tf.identity(prime)
        prime, values = self.checked_inputs(prime, settings)
        previous, logits, states = self.feed_primes(self.encode(prime))
        row_values = {setting.name: values[setting.name] for setting in ROW_SETTINGS}
        tokens = self.generate_rows(values["n"], previous, logits, states, row_values)
        text = self.join_rows(prime, tokens.with_flat_values(tf.gather(self.vocabulary, tokens.flat_values)))
        return {"text": text, "token_ids": tokens.to_tensor(default_value=PAD_ID)}

    def checked_inputs(self, prime, settings):
        """(the prime(s) with CRLF read as LF unless the model keeps it, {name: value} of the settings given in
        GENERATED's order), once every setting passed check_settings; mode 2 becomes 1 at word level."""
        values = {setting.name: value for setting, value in zip(GENERATED, settings)}
        with tf.control_dependencies(check_settings(values)):
            prime = tf.identity(prime)
        if not self.keep_crlf:
            prime = tf.strings.regex_replace(prime, CRLF, NEWLINE)
        if self.word_level:  # every word follows a space, so "sample on spaces" samples at every step
            values["mode"] = tf.where(tf.equal(values["mode"], MODE_SAMPLE_ON_SPACES), MODE_SAMPLE, values["mode"])
        return prime, values

    def feed_primes(self, ids):
        """Feed each row's prime ids (ragged [rows, None]; an empty row gets the empty prime's start id) alone,
        as the Generator feeds one prime, so that a row's state does not depend on its batch-mates: (the last ids
        [rows], the logits after them [rows, vocab], the states, each [rows, size])."""
        model, generator = self.parts.model, self.parts.generator

        # The Generator's own prime pass and (in generate_rows) block: the rows run the code of one sample's.
        def feed(row):
            prime = ids.flat_values[ids.row_splits[row]:ids.row_splits[row + 1]]
            prime = tf.cond(tf.size(prime) > 0, lambda: prime, lambda: tf.constant([self.start_id]))
            previous, logits, states = generator._feed_prime(prime)
            return previous, logits, tuple(state[0] for state in states)

        size = tf.TensorSpec([model.rnn_size], tf.float32)
        return tf.map_fn(feed, tf.range(ids.nrows(out_type=tf.int32)), fn_output_signature=(
            tf.int32, tf.TensorSpec([model.vocab_size], tf.float32), (size,) * model.num_states))

    def generate_rows(self, n, previous, logits, states, settings):
        """Generator.generate's loop of blocks over rows fed by feed_primes, every row at the same position, for
        the largest n[r] steps (the last block runs only the steps it needs); returns the tokens as a ragged
        [rows, n[r]] (fewer once the generator was stopped)."""
        generator, rows = self.parts.generator, tf.size(n)
        longest = tf.reduce_max(tf.concat([n, [0]], 0))

        def body(made, previous, logits, states, counts, tokens):
            steps = tf.minimum(GENERATE_BLOCK, longest - made)
            block, previous, logits, states, counts = generator.graph_block(
                steps, tf.fill([rows], made), previous, logits, states, counts, settings)
            return made + steps, previous, logits, states, counts, tf.concat([tokens, block[:, :steps]], 1)

        def more(made, *_):
            return tf.logical_and(made < longest, tf.logical_not(generator.stopped.read_value()))

        counts = tf.zeros([rows, generator.model.vocab_size], tf.int32)  # the penalties count generated tokens
        start = (tf.constant(0), previous, logits, states, counts, tf.zeros([rows, 0], tf.int32))
        # The tokens grow by a block each time round; the rows' count is known only when the graph runs.
        any_rows = tf.nest.map_structure(lambda t: tf.TensorShape([None] + t.shape.as_list()[1:]), start[1:5])
        invariants = (tf.TensorShape([]), *any_rows, tf.TensorShape([None, None]))
        made, _, _, _, _, tokens = tf.while_loop(more, body, start, shape_invariants=invariants)
        return tf.RaggedTensor.from_tensor(tokens, lengths=tf.minimum(n, made))

    def _step(self, token_ids, states):
        """One step of the network for a batch: token_ids [batch], states [num_states, batch, rnn_size] (zeros to
        start) -> {"logits": [batch, vocab], "states": the next states}."""
        model = self.parts.model
        logits, new_states = model.step(token_ids, tuple(tf.unstack(states, num=model.num_states)))
        return {"logits": logits, "states": tf.stack(new_states)}

    def tokenize(self, texts):
        """UTF-8 strings [rows] -> their tokens, ragged [rows, None] (utils.tokenize); invalid UTF-8 is an error."""
        characters = tf.strings.unicode_split(texts, "UTF-8", errors="strict")
        if not self.word_level:
            return characters
        with tf.control_dependencies([characters.flat_values]):
            # Separating whitespace becomes one space each and a line break gets a space either side, so the
            # pieces between spaces are the words and the line breaks (and empty pieces, dropped).
            spaced = tf.strings.regex_replace(texts, SEPARATOR_CLASS, " ")
            pieces = tf.strings.split(tf.strings.regex_replace(spaced, NEWLINE, f" {NEWLINE} "), sep=" ")
        return tf.ragged.boolean_mask(pieces, tf.strings.length(pieces) > 0)

    def encode(self, texts):
        """UTF-8 strings [rows] -> token ids, ragged [rows, None]; unknown tokens become <unk> where the model has
        one, and are otherwise an error naming them (utils.encode_tokens)."""
        tokens = self.tokenize(texts)
        ids = self.table.lookup(tokens.flat_values)
        if self.unk_id >= 0:
            return tokens.with_flat_values(tf.where(ids < 0, self.unk_id, ids))
        unknown = tf.unique(tf.boolean_mask(tokens.flat_values, ids < 0)).y  # in order of first appearance
        # Quoted with curly quotes: TensorFlow escapes straight ones (and line breaks) in an assertion's message.
        shown = tf.strings.reduce_join("\u201c" + unknown[:MAX_UNKNOWN_SHOWN] + "\u201d", separator=", ")
        more = tf.where(tf.size(unknown) > MAX_UNKNOWN_SHOWN, ", ...", "")
        kind = "words" if self.word_level else "characters"
        known = tf.debugging.Assert(tf.equal(tf.size(unknown), 0),
                                    [f"the prime has {kind} the model does not know: " + shown + more])
        with tf.control_dependencies([known]):
            return tokens.with_flat_values(tf.identity(ids))

    def join_rows(self, primes, tokens):
        """join for each row: primes [rows], tokens ragged [rows, None] -> texts [rows]."""
        if not self.word_level:
            return primes + tf.strings.reduce_join(tokens, axis=-1)
        return tf.map_fn(lambda row: self.join(*row), (primes, tokens), fn_output_signature=tf.string)

    def join(self, prime, tokens):
        """The prime followed by the generated tokens [n] as one string (Sampler.join)."""
        if not self.word_level:
            return prime + tf.strings.reduce_join(tokens)
        newline = tf.equal(tokens, NEWLINE)
        after_newline = tf.concat([[True], newline], 0)[:-1]
        # Words are joined by single spaces; line breaks stand alone (utils.join_tokens).
        text = tf.strings.reduce_join(tf.where(newline | after_newline, "", " ") + tokens)
        needs_space = ((tf.strings.length(prime) > 0) & (tf.strings.length(text) > 0)
                       & ~tf.strings.regex_full_match(prime, ENDS_IN_WHITESPACE)
                       & ~tf.strings.regex_full_match(text, f"(?s){NEWLINE}.*"))
        return prime + tf.where(needs_space, " ", "") + text

    def info(self, loaded):
        """What assets.extra/char_rnn.json says: where the model came from, and what a client of `step` needs."""
        model = self.parts.model
        return {"format": "char-rnn-tensorflow export", "version": 1,
                "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "checkpoint": os.path.abspath(loaded.path), "signatures": list(SIGNATURES),
                "xla": self.xla, "word_level": self.word_level, "keep_crlf": self.keep_crlf, "tokens": loaded.vocab,
                "unk_token": loaded.unk_token, "empty_prime_start_id": self.start_id,
                "model": model.cell_type, "num_layers": model.num_layers, "rnn_size": model.rnn_size,
                "num_states": model.num_states,
                "states": "h, c of each LSTM layer (h of each GRU or RNN layer), first layer first"}


def check_rows(prime, settings):
    """Graph asserts that each setting (GENERATE_BATCH_INPUTS' order) has one value per prime."""
    rows = tf.size(prime)
    return [tf.debugging.Assert(tf.equal(tf.size(value), rows), [
        f"every input needs one value per prime: {spec.name} has", tf.size(value), "for", rows, "primes"])
        for spec, value in zip(GENERATE_BATCH_INPUTS[1:], settings)]


def check_settings(values):
    """settings.check_settings as graph asserts, in its order and with its reasons: a bad setting fails the call
    with the same one-line reason (the value it got follows it; in a batch, the rows' values that are bad).
    values: {name: scalar or [rows] tensor}, by SampleSettings field."""
    asserts = []
    for setting in GENERATED:
        value = values[setting.name]
        if setting.choices is not None:
            valid = tf.reduce_any(tf.equal(value[..., tf.newaxis], list(setting.choices)), axis=-1)
        else:
            valid = (value >= tf.constant(setting.low, value.dtype)) & (value <= tf.constant(setting.high, value.dtype))
        shown = value if value.shape.rank == 0 else tf.boolean_mask(value, tf.logical_not(valid))
        asserts.append(tf.debugging.Assert(tf.reduce_all(valid), [f"{setting.reason()}, got", shown]))
    return asserts


# ----------------------------------------------------------------------------------------------------------
# The export dir


def is_export(path):
    """Whether a folder holds an export written here (a SavedModel and its char_rnn.json)."""
    return all(os.path.isfile(os.path.join(path, name)) for name in (SAVED_MODEL_FILE, INFO_FILE))


def check_export_dir(export_dir, force):
    """Refuse (ValueError) an export dir whose contents would be lost; returns whether an earlier export will be
    replaced (only with force)."""
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ValueError(f"--export_dir {export_dir} is a file; give a folder")
    if not os.path.isdir(export_dir) or not os.listdir(export_dir):
        return False
    if not is_export(export_dir):
        raise ValueError(f"--export_dir {export_dir} holds files that are not an export of export.py; "
                         f"give a new or empty folder")
    if not force:
        next_version = os.path.join(os.path.dirname(os.path.normpath(export_dir)), "2")
        raise ValueError(f"{export_dir} holds an earlier export; give --force to replace it, or another version "
                         f"folder (e.g. --export_dir {next_version})")
    return True


def write_export(loaded, export_dir, tflite=False, xla=False):
    """Save the SavedModel of a savedir.Loaded (and with tflite, its step as LiteRT) into export_dir; with xla,
    its generation blocks are compiled by XLA (see ExportedModel).

    It is written complete into a temporary folder beside export_dir and renamed into place; an earlier export
    there (check_export_dir decides whether one may be replaced) is set aside first and removed last.
    """
    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        exported = ExportedModel(loaded, xla)
        try:
            tf.saved_model.save(exported, work, signatures=exported.signatures())
            if tflite:
                _write_file(os.path.join(work, TFLITE_FILE), step_to_tflite(exported))
        except tf.errors.OpError as e:  # a full disk, a folder removed meanwhile: TensorFlow's own error types
            raise OSError(f"could not write the export into {parent}: {e.message}") from None
        _write_file(os.path.join(work, INFO_FILE), json.dumps(exported.info(loaded), indent=1).encode("utf-8"))
        os.chmod(work, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the model from a server's user
        _replace_dir(work, export_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def step_to_tflite(exported):
    """An ExportedModel's step for one sequence (batch 1), converted to a LiteRT (TFLite) flatbuffer, as bytes:
    inputs token_ids [1] and states [num_states, 1, rnn_size], outputs logits [1, vocab] and states."""
    model = exported.parts.model
    step = tf.function(exported.step.python_function).get_concrete_function(
        tf.TensorSpec([1], tf.int32, name="token_ids"),
        tf.TensorSpec([model.num_states, 1, model.rnn_size], tf.float32, name="states"))
    # The step's weights alone (the vocabulary table is no LiteRT op), as TensorFlow's own variables: given
    # Keras' variables, the converter keeps them as LiteRT variables that nothing initialises (NaN logits).
    weights = tf.Module()
    weights.saved_variables = [variable.value for variable in model.variables]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([step], weights)
    try:
        return converter.convert()
    except Exception as e:  # the converter's own error types, from a library that is not always installed
        raise OSError(f"the LiteRT conversion of step failed: {str(e).splitlines()[0]}") from None


def _write_file(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _replace_dir(new, target):
    """Rename the folder `new` to `target`; an existing `target` (empty, or an earlier export) is set aside first
    and removed once the new one is in place, so `target` never holds half an export."""
    if os.path.isdir(target) and not os.listdir(target):
        os.rmdir(target)
    if not os.path.exists(target):
        os.rename(new, target)
        return
    old = target.rstrip(os.sep) + f".old-{os.getpid()}"
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
