"""analyze.py and analysis.py: the bits per token are the full pass's loss, each position's probability and the
tracked cell state are what model.step computes one token at a time, a cell of a model trained on quoted text
tracks "inside quotes", and bad input is one line with nothing written."""
import json
import math
import random

import numpy as np
import pytest
import tensorflow as tf

import analysis
import analysis_report
import analyze
import evaluation
import savedir
import train
import utils
from conftest import TINY_MODEL, error_line, make_data_dir
from settings import ModelConfig

# Text the conftest model knows (its lower-case lines), long enough for several chunks of the pass.
KNOWN_TEXT = ("the dog sat on the mat.\nthe cat sat on the log.\n" * 12)[:531]


@pytest.fixture(scope="module")
def loaded(trained_save_dir):
    return savedir.load(trained_save_dir)


def char_ids(vocab, text):
    return [vocab.index(c) for c in text]


def analyze_json(capsys, tmp_path, save_dir, text, *flags):
    """Run analyze.py's main on `text` with --json and --html; returns (its JSON, the HTML's path)."""
    source, out, page = tmp_path / "text.txt", tmp_path / "analysis.json", tmp_path / "report.html"
    source.write_text(text, encoding="utf-8")
    capsys.readouterr()
    code = analyze.main(["--save_dir", save_dir, str(source), "--json", str(out), "--html", str(page),
                         *map(str, flags)])
    assert code == 0, capsys.readouterr().err
    return json.loads(out.read_text(encoding="utf-8")), page


def test_bits_per_token_is_the_full_pass_loss_of_the_text_read_as_one_stream(loaded, trained_save_dir, tmp_path,
                                                                            capsys):
    data, _ = analyze_json(capsys, tmp_path, trained_save_dir, KNOWN_TEXT)
    expected, count = evaluation.full_pass_loss(loaded.model, char_ids(loaded.vocab, KNOWN_TEXT), num_streams=1)
    assert data["streams"] == 1 and data["predicted"] == count == len(KNOWN_TEXT) - 1
    assert data["bits_per_token"] == pytest.approx(expected / math.log(2), abs=1e-5)
    assert f"{data['bits_per_token']:.4f} bits per token" in capsys.readouterr().out
    assert [entry["token"] for entry in data["positions"]] == list(KNOWN_TEXT)


def softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


def test_each_position_and_cell_state_is_what_model_step_computes(loaded):
    ids = char_ids(loaded.vocab, KNOWN_TEXT)
    top = 3
    result = analysis.Analyzer(loaded.model).run(ids, 0, top)
    states = loaded.model.zero_state(1)
    for t in range(len(ids) - 1):
        logits, states = loaded.model.step(tf.constant([ids[t]], tf.int32), states)
        probabilities = softmax(logits.numpy()[0])
        assert math.exp(-result.losses[t]) == pytest.approx(probabilities[ids[t + 1]], rel=1e-4, abs=1e-6)
        assert result.top_probabilities[t] == pytest.approx(np.sort(probabilities)[::-1][:top], rel=1e-4, abs=1e-6)
        assert probabilities[result.top_ids[t]] == pytest.approx(np.sort(probabilities)[::-1][:top], rel=1e-4)
        # The tracked state is the LSTM's cell state c, the last of the layer's (h, c).
        assert result.activations[t] == pytest.approx(states[-1].numpy()[0], abs=1e-4)


@pytest.mark.parametrize("cell_type", ["gru", "rnn", "lstm"])
def test_the_tracked_state_of_any_layer_is_the_one_model_step_computes(cell_type, monkeypatch):
    # An untrained 2-layer model (its weights as Keras draws them): layer 1 of 2 is tracked, h for a GRU or an RNN.
    # Chunks of 20 steps: a small graph, and the state carried through 8 of them.
    monkeypatch.setattr(analysis, "ANALYSIS_CHUNK", 20)
    model = savedir.build_model(ModelConfig(vocab_size=7, model=cell_type, rnn_size=8, num_layers=2))
    ids = list(np.random.default_rng(0).integers(0, 7, 150))
    result = analysis.Analyzer(model).run(ids, 0, top=2)
    states = model.zero_state(1)
    for t in range(len(ids) - 1):
        _, states = model.step(tf.constant([ids[t]], tf.int32), states)
        first_layer = model.layer_states(states, 0)
        assert result.activations[t] == pytest.approx(first_layer[-1].numpy()[0], abs=1e-4)


def test_a_long_text_is_read_in_streams_as_the_full_pass_reads_it(loaded):
    # With a report window of 50 positions, 530 predictions are cut into 10 streams (each at least 50 long).
    ids = char_ids(loaded.vocab, KNOWN_TEXT)
    analyzer = analysis.Analyzer(loaded.model)
    result = analyzer.run(ids, 0, window=50)
    assert result.streams == 10
    expected, _ = evaluation.full_pass_loss(loaded.model, ids, num_streams=10)
    assert float(np.mean(result.losses, dtype=np.float64)) == pytest.approx(expected, abs=1e-6)
    one_stream = analyzer.run(ids, 0)
    assert result.activations.shape == (50, loaded.model.rnn_size)
    assert result.activations == pytest.approx(one_stream.activations[:50], abs=1e-5)  # stream 0 is the start


def test_features_of_a_text():
    text = 'Ab "cd (e)"\n  f\n'
    features = analysis.token_features(list(text))
    as_text = {name: "".join(str(int(v)) for v in values) for name, values in features.items()}
    assert as_text["inside quotes"] == "0001111111000000"
    assert as_text["inside brackets"] == "0000000110000000"
    assert as_text["start of word"] == "1000100010000010"
    assert as_text["after line break"] == "1000000000001000"
    assert as_text["uppercase"] == "1000000000000000"
    assert as_text["indentation"] == "0000000000001100"
    assert list(features["position in line"]) == [*range(12), 0, 1, 2, 3]


def test_correlations_accumulated_chunk_by_chunk_are_pearsons_r():
    rng = np.random.default_rng(0)
    cells, features = rng.normal(size=(500, 4)), rng.normal(size=(500, 3))
    features[:, 2] = 2 * cells[:, 1] + 0.1 * features[:, 2]
    correlations = analysis.Correlations(4, list(features.T))
    for start in range(0, 500, 70):  # chunks of 70 positions; the last one half padding (weight 0)
        chunk = slice(start, start + 70)
        padding = 70 - len(cells[chunk])
        weights = np.concatenate([np.ones(len(cells[chunk])), np.zeros(padding)])
        pad = lambda array: np.concatenate([array, np.ones((padding, array.shape[1]))])  # noqa: E731
        sums = analysis.sums_of(tf.constant(pad(cells[chunk])[np.newaxis]), tf.constant(weights[np.newaxis]),
                                tf.constant(pad(features[chunk])[np.newaxis]))
        correlations.add(*(sum_.numpy() for sum_ in sums))
    expected = np.corrcoef(cells.T, features.T)[:4, 4:]
    assert correlations.pearson() == pytest.approx(expected, abs=1e-9)


def quoted_text(seed, lines):
    """Lines of lower-case words with quoted passages of upper-case words between them: knowing whether it is
    inside quotes tells the model which kind of word comes next."""
    rng = random.Random(seed)
    outside = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "he", "said", "so"]
    inside = ["RUN", "NOW", "STOP", "GO", "HELP", "NO", "YES"]
    text = []
    for _ in range(lines):
        words = []
        for _ in range(rng.randint(1, 3)):
            words += rng.choices(outside, k=rng.randint(1, 4))
            words.append('"' + " ".join(rng.choices(inside, k=rng.randint(1, 5))) + '"')
        text.append(" ".join(words + rng.choices(outside, k=rng.randint(0, 3))))
    return "\n".join(text) + "\n"


QUOTES_MODEL = ["--rnn_size", "16", "--num_layers", "1", "--batch_size", "8", "--seq_length", "25",
                "--learning_rate", "0.01", "--max_steps", "300"]


@pytest.mark.slow
def test_a_cell_of_a_model_trained_on_quoted_text_tracks_inside_quotes(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data", quoted_text(0, 400))
    save = str(tmp_path / "save")
    assert train.main(["--data_dir", data, "--save_dir", save, *QUOTES_MODEL, "--seed", "1",
                       "--print_every", "1000"]) == 0
    analysis_data, _ = analyze_json(capsys, tmp_path, save, quoted_text(1, 100), "--cells", 3)
    best = analysis_data["cells"][0]
    assert best["feature"] == "inside quotes"
    assert abs(best["r"]) > 0.5  # the sign is the cell's choice: on inside quotes, or off
    assert f"cell {best['cell']}: inside quotes, r = {best['r']:+.3f}" in capsys.readouterr().out


def test_the_json_lists_alternatives_lines_and_cells_and_the_report_inlines_it(trained_save_dir, tmp_path, capsys):
    data, page = analyze_json(capsys, tmp_path, trained_save_dir, KNOWN_TEXT, "--top", 4, "--cells", 2,
                              "--layer", 1)
    assert data["layer"] == 1 and data["state"] == "cell state c" and len(data["cells"]) == 2
    second = data["positions"][1]
    assert len(second["alternatives"]) == 4 and second["bits"] == pytest.approx(-math.log2(second["probability"]),
                                                                                rel=1e-3)
    assert all(len(cell["activations"]) == data["predicted"] for cell in data["cells"])
    assert 1 <= len(data["surprising_lines"]) <= analysis.SURPRISING_LINES
    html = page.read_text(encoding="utf-8")
    assert "renderAnalysis(" in html and "http://" not in html and "https://" not in html and " src=" not in html
    inlined = html.split("const ANALYSIS = ", 1)[1].split(";\n", 1)[0]
    assert json.loads(inlined)["positions"] == data["positions"]


def test_a_report_of_a_long_text_covers_its_first_tokens_and_says_so():
    data = {"source": "long.txt", "positions": [{"token": "a"}] * 30, "tokens": 30}
    html = analysis_report.report_html(data, window=10)
    inlined = json.loads(html.split("const ANALYSIS = ", 1)[1].split(";\n", 1)[0])
    assert len(inlined["positions"]) == 10 and inlined["tokens"] == 30


def test_the_json_has_every_token_and_the_report_the_first_ones(trained_save_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(analyze, "REPORT_MAX_TOKENS", 100)
    data, page = analyze_json(capsys, tmp_path, trained_save_dir, KNOWN_TEXT)
    assert [entry["token"] for entry in data["positions"]] == list(KNOWN_TEXT)
    inlined = json.loads(page.read_text(encoding="utf-8").split("const ANALYSIS = ", 1)[1].split(";\n", 1)[0])
    assert inlined["positions"] == data["positions"][:100] and inlined["tokens"] == len(KNOWN_TEXT)
    assert "(the first 100 tokens)" in capsys.readouterr().out


def test_a_text_with_unknown_characters_is_refused_by_name_and_nothing_is_written(trained_save_dir, tmp_path,
                                                                                 capsys):
    source, page = tmp_path / "text.txt", tmp_path / "report.html"
    source.write_text("the zebra sat\n", encoding="utf-8")
    assert analyze.main(["--save_dir", trained_save_dir, str(source), "--html", str(page)]) == 2
    assert "'z', 'b', 'r'" in error_line(capsys)
    assert not page.exists()


@pytest.mark.parametrize("flags, reason", [
    (["--layer", "2"], "layer must be from 1 to 1"),
    (["--html", "{text}"], "must not name the text"),
    (["--json", "{out}", "--html", "{out}"], "name the same file"),
])
def test_bad_requests_are_one_line(trained_save_dir, tmp_path, capsys, flags, reason):
    source = tmp_path / "text.txt"
    source.write_text(KNOWN_TEXT, encoding="utf-8")
    flags = [flag.format(text=source, out=tmp_path / "out") for flag in flags]
    assert analyze.main(["--save_dir", trained_save_dir, str(source), *flags]) == 2
    assert reason in error_line(capsys)
    assert source.read_text(encoding="utf-8") == KNOWN_TEXT


@pytest.mark.parametrize("flag", ["--top", "--cells"])
def test_top_and_cells_out_of_range_are_refused_by_argparse(flag, capsys):
    with pytest.raises(SystemExit) as refused:
        analyze.main(["text.txt", flag, "0"])
    assert refused.value.code == 2 and flag in capsys.readouterr().err


def test_word_level_maps_unknown_words_to_unk_when_the_model_has_it(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data", "the cat sat on the mat.\nthe dog sat on the log.\n" * 60)
    save = str(tmp_path / "save")
    assert train.main(["--data_dir", data, "--save_dir", save, "--word_level", "--max_vocab", "5", *TINY_MODEL,
                       "--max_steps", "2", "--print_every", "1000", "--seed", "1"]) == 0
    analysis_data, _ = analyze_json(capsys, tmp_path, save, "the zebra sat on the mat.\n", "--top", 20)
    assert analysis_data["level"] == "word"
    positions = analysis_data["positions"]
    assert [entry["token"] for entry in positions] == ["the", "zebra", "sat", "on", "the", "mat.", "\n"]
    # "zebra" is scored as <unk>: its probability is the one the model gave <unk> (every token is listed).
    alternatives = dict(positions[1]["alternatives"])
    assert len(alternatives) == 6 and alternatives[utils.UNK_TOKEN] == positions[1]["probability"]
