"""export.py: a SavedModel that takes text and returns text. Loaded in a fresh Python that cannot import the
project, it gives sample.py's exact text for the same settings and seed (character and word level, modes 0, 1
and 2, an empty prime, CRLF, odd whitespace, <unk>) and refuses unknown characters and bad settings in the graph;
its signatures are the ones README lists; it holds no XLA; its LiteRT step computes the model's logits; export.py
never replaces what is not an earlier export."""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import export
import exporter
import sample
import savedir
import train
from conftest import TINY_MODEL, error_line, make_data_dir, snapshot
from sampler import GENERATE_BLOCK, Sampler
from settings import SampleSettings

WORD_TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n" * 60
ONE_EPOCH = ["--num_epochs", "1", "--print_every", "1000", "--seed", "1"]
# (prime, n, mode, temperature, seed, top_k, top_p): every mode, an empty prime, a run past one generation
# block, top-k, top-p, CRLF in the prime, whitespace that only Python's \s knows, a seed above 32 bits.
CHAR_CASES = [("the ", 60, 0, 1.0, 7, 0, 1.0), ("the ", 60, 1, 1.0, 7, 0, 1.0),
              ("the ", GENERATE_BLOCK + 30, 2, 0.8, 11, 0, 1.0), ("", 40, 1, 1.5, 3, 0, 1.0),
              ("the\r\ncat ", 50, 1, 1.0, 5, 3, 1.0), ("on the mat", 40, 2, 1.2, 2 ** 40 + 9, 0, 1.0),
              ("the ", 60, 1, 1.5, 8, 0, 0.7)]
WORD_CASES = [("the cat", 30, 0, 1.0, 5, 0, 1.0), ("the cat", 30, 1, 1.0, 5, 0, 1.0),
              ("the cat ", 30, 2, 0.9, 6, 0, 1.0), ("", 25, 1, 1.0, 8, 0, 1.0),
              ("the\u00a0cat\t\tsat\x1c\r\n\n on", 30, 2, 1.3, 9, 2, 1.0), ("log.\n", 20, 1, 1.0, 4, 0, 0.8)]
CAPPED_CASES = [("the dog sat on the log.", 30, 1, 1.0, 12, 0, 1.0),
                ("dog", 20, 2, 1.0, 13, 0, 1.0)]  # dog, log. -> <unk>
GENERATE_INPUTS = {"prime": ([], tf.string), "n": ([], tf.int32), "temperature": ([], tf.float32),
                   "sample_mode": ([], tf.int32), "top_k": ([], tf.int32), "top_p": ([], tf.float32),
                   "seed": ([], tf.int64), "frequency_penalty": ([], tf.float32),
                   "presence_penalty": ([], tf.float32)}
GENERATE_OUTPUTS = {"text": ([], tf.string), "token_ids": ([None], tf.int32)}

# Run with `python -I` from a folder outside the repository: only TensorFlow, never the project's code.
CLIENT = r"""
import json, sys
try:
    import sampler
    sys.exit("the project's code is importable")
except ImportError:
    pass
import tensorflow as tf
models, results = {}, []
for case in json.load(sys.stdin):
    if case["export_dir"] not in models:
        models[case["export_dir"]] = tf.saved_model.load(case["export_dir"])
    generate = models[case["export_dir"]].signatures["serving_default"]
    try:
        out = generate(prime=tf.constant(case["prime"]), n=tf.constant(case["n"], tf.int32),
                       temperature=tf.constant(case["temperature"], tf.float32),
                       sample_mode=tf.constant(case["mode"], tf.int32), top_k=tf.constant(case["top_k"], tf.int32),
                       top_p=tf.constant(case["top_p"], tf.float32), seed=tf.constant(case["seed"], tf.int64),
                       frequency_penalty=tf.constant(0.0), presence_penalty=tf.constant(0.0))
        results.append(out["text"].numpy().decode("utf-8"))
    except tf.errors.InvalidArgumentError as e:
        results.append("error: " + e.message)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def exports(trained_save_dir, tmp_path_factory):
    """{level: (save dir, export dir)}: the shared character model (exported with --tflite) and two word-level
    models, one with a capped vocabulary (<unk>), each exported by export.py."""
    root = tmp_path_factory.mktemp("export")
    data = make_data_dir(root / "data", WORD_TEXT)
    saves = {"char": trained_save_dir, "word": str(root / "word"), "capped": str(root / "capped")}
    for level, extra in (("word", []), ("capped", ["--max_vocab", "5"])):
        assert train.main(["--data_dir", data, "--save_dir", saves[level], "--word_level", *TINY_MODEL,
                           *ONE_EPOCH, *extra]) == 0
    result = {}
    for level, save in saves.items():
        export_dir = str(root / "exports" / level / "1")
        assert export.main(["--save_dir", save, "--export_dir", export_dir, *(["--tflite"] * (level == "char"))]) == 0
        result[level] = (save, export_dir)
    return result


@pytest.fixture(scope="module")
def char_export(exports):
    return tf.saved_model.load(exports["char"][1])


def sample_py(save_dir, prime, n, mode, temperature, seed, top_k, top_p, capsys):
    """What sample.py prints for these settings, without its final newline."""
    capsys.readouterr()
    assert sample.main(["--save_dir", save_dir, "--prime", prime, "-n", str(n), "--sample", str(mode),
                        "--temperature", str(temperature), "--seed", str(seed), "--top_k", str(top_k),
                        "--top_p", str(top_p)]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


@pytest.mark.slow
def test_a_fresh_python_without_the_project_gets_sample_pys_text(exports, tmp_path, capsys):
    cases, expected = [], []
    for level, level_cases in (("char", CHAR_CASES), ("word", WORD_CASES), ("capped", CAPPED_CASES)):
        save, export_dir = exports[level]
        sampler = Sampler.load(save)  # what sample.py prints (checked against sample.py once per level below)
        for i, (prime, n, mode, temperature, seed, top_k, top_p) in enumerate(level_cases):
            cases.append({"export_dir": export_dir, "prime": prime, "n": n, "mode": mode,
                          "temperature": temperature, "seed": seed, "top_k": top_k, "top_p": top_p})
            expected.append(sampler.sample(prime, n, mode, temperature, seed, top_k, top_p))
            if i == 1:
                assert sample_py(save, prime, n, mode, temperature, seed, top_k, top_p, capsys) == expected[-1]
    # Refused in the graph: an unknown character, an unknown word, a bad setting.
    refusals = [(exports["char"][1], "the Zebra\u00e9", 1.0, "the prime has characters the model does not know: "
                 + ", ".join(f"\u201c{c}\u201d" for c in "Zbr\u00e9")),
                (exports["word"][1], "the zebra cat", 1.0,
                 "the prime has words the model does not know: \u201czebra\u201d"),
                (exports["char"][1], "the", 0.0, "temperature must be a number from 1.2e-38 to 3.4e+38, got")]
    for export_dir, prime, temperature, message in refusals:
        cases.append({"export_dir": export_dir, "prime": prime, "n": 10, "mode": 1, "temperature": temperature,
                      "seed": 1, "top_k": 0, "top_p": 1.0})
        expected.append(message)
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTHON")}
    result = subprocess.run([sys.executable, "-I", "-c", CLIENT], input=json.dumps(cases), capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    texts = json.loads(result.stdout.strip().splitlines()[-1])
    for case, text, wanted in zip(cases, texts, expected):
        if case["temperature"] == 0.0 or "Zebra" in case["prime"] or "zebra" in case["prime"]:
            assert text.startswith("error: ") and "assertion failed: [" + wanted in text, (case, text)
        else:
            assert text == wanted, case
    assert len(set(texts[:len(CHAR_CASES)])) == len(CHAR_CASES)  # the settings matter


def test_signatures_take_and_give_what_readme_lists(exports, char_export):
    model = savedir.load(exports["char"][0]).model
    assert set(char_export.signatures) == {"serving_default", "generate", "step"}
    for name in ("serving_default", "generate"):
        signature = char_export.signatures[name]
        assert _specs(signature.structured_input_signature[1]) == GENERATE_INPUTS
        assert _specs(signature.structured_outputs) == GENERATE_OUTPUTS
    step = char_export.signatures["step"]
    states = ([model.num_states, None, model.rnn_size], tf.float32)
    assert _specs(step.structured_input_signature[1]) == {"token_ids": ([None], tf.int32), "states": states}
    assert _specs(step.structured_outputs) == {"logits": ([None, model.vocab_size], tf.float32), "states": states}
    info = json.load(open(os.path.join(exports["char"][1], exporter.INFO_FILE), encoding="utf-8"))
    assert info["tokens"] == savedir.read_vocab(exports["char"][0])[0] and info["num_states"] == model.num_states


def _specs(structure):
    return {name: (spec.shape.as_list(), spec.dtype) for name, spec in structure.items()}


def test_the_export_holds_no_xla(exports):
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(exports["word"][1], exporter.SAVED_MODEL_FILE), "rb") as f:
        saved.ParseFromString(f.read())
    functions = saved.meta_graphs[0].graph_def.library.function
    assert any(f.signature.name.startswith("__inference__generate_block") for f in functions)
    for function in functions:
        assert not (function.attr["_XlaMustCompile"].b or function.attr["_XlaCompile"].b), function.signature.name
        assert not [node.op for node in function.node_def if node.op.startswith("Xla")]


@pytest.mark.parametrize("setting, value, message", [
    ("n", -1, "n must be an integer from 0 to"), ("sample_mode", 3, "sample_mode must be one of 0 (argmax)"),
    ("temperature", float("nan"), "temperature must be a number"), ("top_k", -2, "top_k must be an integer"),
    ("top_p", 0.0, "top_p must be a number in (0, 1]"), ("top_p", 1.5, "top_p must be a number in (0, 1]"),
    ("seed", -5, "seed must be an integer in [0, 9223372036854775807]"), ("prime", b"\xff", "Invalid"),
    ("frequency_penalty", 2.5, "frequency_penalty must be a number from -2 to 2"),
    ("presence_penalty", float("nan"), "presence_penalty must be a number from -2 to 2")])
def test_bad_settings_are_refused_in_the_graph(char_export, setting, value, message):
    settings = {"prime": "the", "n": 5, "temperature": 1.0, "sample_mode": 1, "top_k": 0, "top_p": 1.0, "seed": 1,
                "frequency_penalty": 0.0, "presence_penalty": 0.0, setting: value}
    dtypes = {name: dtype for name, (_, dtype) in GENERATE_INPUTS.items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
        char_export.signatures["generate"](**{name: tf.constant(v, dtypes[name]) for name, v in settings.items()})


@pytest.mark.parametrize("mode", [0, 1])
def test_the_exports_penalty_inputs_give_the_samplers_text(exports, char_export, mode):
    settings = SampleSettings("the ", GENERATE_BLOCK + 20, mode, 1.0, 5, frequency_penalty=0.6, presence_penalty=-0.3)
    out = char_export.signatures["generate"](
        prime=tf.constant(settings.prime), n=tf.constant(settings.n), temperature=tf.constant(1.0),
        sample_mode=tf.constant(mode), seed=tf.constant(5, tf.int64), top_k=tf.constant(0), top_p=tf.constant(1.0),
        frequency_penalty=tf.constant(0.6), presence_penalty=tf.constant(-0.3))
    expected = Sampler.load(exports["char"][0]).run(settings)
    assert out["text"].numpy().decode("utf-8") == expected
    assert expected != Sampler.load(exports["char"][0]).run(SampleSettings("the ", settings.n, mode, 1.0, 5))


def test_the_litert_step_computes_the_models_logits(exports):
    model = savedir.load(exports["char"][0]).model
    with warnings.catch_warnings():  # tf.lite.Interpreter points to the ai-edge-litert package; it still runs
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=os.path.join(exports["char"][1], exporter.TFLITE_FILE))
    step = interpreter.get_signature_runner()
    states = tuple(np.zeros([1, model.rnn_size], np.float32) for _ in range(model.num_states))
    lite_states = np.stack(states)
    for token in [1, 4, 0, 2, 2, 3]:
        logits, states = model.step(tf.constant([token]), states)
        lite = step(token_ids=np.array([token], np.int32), states=lite_states)
        np.testing.assert_allclose(lite["logits"], logits.numpy(), atol=1e-5)
        lite_states = lite["states"]
    np.testing.assert_allclose(lite_states, np.stack([s.numpy() for s in states]), atol=1e-5)


def test_export_py_never_replaces_what_is_not_an_earlier_export(exports, tmp_path, capsys):
    save = exports["char"][0]
    assert export.main(["--save_dir", str(tmp_path / "missing")]) == 1
    assert "does not exist" in error_line(capsys)
    foreign = tmp_path / "foreign"
    make_data_dir(foreign)
    before = snapshot(foreign)
    assert export.main(["--save_dir", save, "--export_dir", str(foreign), "--force"]) == 2
    assert "not an export of export.py" in error_line(capsys) and snapshot(foreign) == before
    earlier = str(tmp_path / "models" / "1")
    shutil.copytree(exports["capped"][1], earlier)
    assert export.main(["--save_dir", save, "--export_dir", earlier]) == 2
    assert "holds an earlier export; give --force" in error_line(capsys)
    assert json.load(open(os.path.join(earlier, exporter.INFO_FILE)))["word_level"]  # still the word model
    assert export.main(["--save_dir", save, "--export_dir", str(foreign / "input.txt" / "1")]) == 1
    assert "input.txt" in error_line(capsys)
    assert export.main(["--save_dir", save, "--export_dir", earlier, "--force"]) == 0
    assert capsys.readouterr().out.startswith(f"replaced the earlier export in {earlier}")
    assert not json.load(open(os.path.join(earlier, exporter.INFO_FILE)))["word_level"]
    assert sorted(os.listdir(tmp_path / "models")) == ["1"]  # no temporary or set-aside folder left
