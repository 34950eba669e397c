"""Word level end to end (line breaks, the vocabulary cap, unknown prime words, sample mode 2, evaluation with
<unk>), the caches of one data dir, and word2vec embeddings (rows set by word, every file format compressed or not
and without a header line, a vector size other than rnn_size, clear errors)."""
import glob
import gzip
import json
import os
import pickle

import numpy as np
import pytest

import download
import embeddings
import evaluate
import evaluation
import sample
import savedir
import train
import utils
from conftest import REAL_CORPUS, TINY_MODEL, make_data_dir, run_script
from sample_text import SampleText
from sampler import Sampler
from test_evaluate import reference_loss

WORD_TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n" * 60
# Its words by falling count: "the" 240, "\n" "on" "sat" 120 each, then "cat" "dog" "log." "mat." 60 each.
WORDS = ["the", "\n", "on", "sat", "cat", "dog", "log.", "mat."]
CAP = "5"  # --max_vocab: keeps the, \n, on, sat, cat
RNN_SIZE = int(TINY_MODEL[TINY_MODEL.index("--rnn_size") + 1])
VECTOR_SIZE = RNN_SIZE // 2  # deliberately not rnn_size
# The word vectors are trained on one of the two lines only: "dog", "log." and the line break have none.
VECTOR_SENTENCES = [["the", "cat", "sat", "on", "the", "mat."]] * 20
WITHOUT_VECTOR = ["dog", "log.", "\n"]
MISSING_MESSAGE = f"{len(WITHOUT_VECTOR)} of {len(WORDS)} tokens have no vector; they start random"
FORMATS = ["word2vec.txt", "word2vec.bin", "keyedvectors.kv", "word2vec.model",
           "word2vec.txt.gz", "word2vec.bin.gz", "glove.txt", "glove.txt.gz"]  # glove: no "COUNT SIZE" line
TINY_LEARNING_RATE = "1e-9"  # one Adam step then moves each weight by at most about this much
ONE_EPOCH = ["--num_epochs", "1", "--print_every", "1000", "--seed", "1"]


def train_words(data, save, *extra):
    """Train a tiny word-level model for one epoch on `data`; returns the exit code."""
    return train.main(["--data_dir", data, "--save_dir", save, "--word_level", *TINY_MODEL, *ONE_EPOCH, *extra])


@pytest.fixture(scope="module")
def word_models(tmp_path_factory):
    """One data dir and two word-level models trained on it: capped (with <unk>) and uncapped."""
    root = tmp_path_factory.mktemp("words")
    data = make_data_dir(root / "data", WORD_TEXT)
    capped, uncapped = str(root / "capped"), str(root / "uncapped")
    assert train_words(data, capped, "--max_vocab", CAP) == 0
    assert train_words(data, uncapped) == 0
    return {"data": data, "capped": capped, "uncapped": uncapped}


@pytest.fixture(scope="module")
def min_count_model(word_models, tmp_path_factory):
    """A word-level model trained (one step) with --min_count 61: the words seen 60 times become <unk>."""
    save = str(tmp_path_factory.mktemp("min_count") / "save")
    assert train_words(word_models["data"], save, "--min_count", "61", "--max_steps", "1") == 0
    assert savedir.read_vocab(save) == (WORDS[:4] + [utils.UNK_TOKEN], utils.UNK_TOKEN)
    return save


@pytest.fixture(scope="module")
def vector_files(tmp_path_factory):
    """A small gensim Word2Vec saved in every supported format; returns (vectors by word, {format: path})."""
    from gensim.models import Word2Vec
    root = tmp_path_factory.mktemp("vectors")
    model = Word2Vec(VECTOR_SENTENCES, vector_size=VECTOR_SIZE, min_count=1, workers=1, seed=1)
    paths = {name: str(root / name) for name in FORMATS}
    model.wv.save_word2vec_format(paths["word2vec.txt"], binary=False)
    model.wv.save_word2vec_format(paths["word2vec.bin"], binary=True)
    model.wv.save(paths["keyedvectors.kv"])
    model.save(paths["word2vec.model"])
    with open(paths["word2vec.txt"], "rb") as f:
        header, _, body = f.read().partition(b"\n")
    assert header == f"{len(model.wv)} {VECTOR_SIZE}".encode()
    with open(paths["glove.txt"], "wb") as f:
        f.write(body)
    for name in ("word2vec.txt", "word2vec.bin", "glove.txt"):
        with open(paths[name], "rb") as f, gzip.open(paths[name + ".gz"], "wb") as out:
            out.write(f.read())
    return {word: model.wv[word].copy() for word in model.wv.index_to_key}, paths


# ----------------------------------------------------------------------------------------------------------
# Word level end to end


def test_word_level_sample_has_line_breaks_and_the_cap_adds_unk(word_models, capsys):
    assert savedir.read_vocab(word_models["capped"]) == (WORDS[:int(CAP)] + [utils.UNK_TOKEN], utils.UNK_TOKEN)
    assert savedir.read_vocab(word_models["uncapped"]) == (WORDS, None)
    capsys.readouterr()
    assert sample.main(["--save_dir", word_models["capped"], "-n", "100", "--prime", "the zebra", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the zebra ") and "\n" in text.rstrip("\n")


def test_unknown_prime_word_maps_to_unk_with_a_cap(word_models):
    sampler = Sampler.load(word_models["capped"])
    ids = sampler.encode("the zebra dog")  # "dog" fell under the cap, "zebra" was never seen
    assert [sampler.vocab[i] for i in ids] == ["the", utils.UNK_TOKEN, utils.UNK_TOKEN]


@pytest.mark.slow
def test_unknown_prime_word_is_refused_by_name_without_a_cap(word_models):
    result = run_script("sample.py", "--save_dir", word_models["uncapped"], "-n", "5", "--prime", "the zebra cat")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "'zebra'" in result.stderr and "'cat'" not in result.stderr


@pytest.mark.slow
def test_one_epoch_on_tinyshakespeare_at_word_level(tmp_path, capsys):
    data = tmp_path / "data"
    download.download(REAL_CORPUS, str(data / download.INPUT_FILE), download.TINYSHAKESPEARE_SHA256)
    save = str(tmp_path / "save")
    # Long sequences and a capped vocabulary keep a full epoch (23 batches) down to seconds; a higher
    # learning rate lets so few steps learn how often lines break (about one token in six).
    assert train.main(["--data_dir", str(data), "--save_dir", save, "--word_level", "--max_vocab", "2000",
                       "--rnn_size", "16", "--num_layers", "1", "--batch_size", "100", "--seq_length", "100",
                       "--learning_rate", "0.01", *ONE_EPOCH]) == 0
    assert len(savedir.read_vocab(save)[0]) == 2001
    capsys.readouterr()
    assert sample.main(["--save_dir", save, "-n", "200", "--prime", "ROMEO:", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and text.rstrip("\n").count("\n") >= 5


def test_word_and_character_caches_of_one_data_dir_never_mix(word_models, tmp_path):
    data = word_models["data"]
    save = str(tmp_path / "chars")
    assert train.main(["--data_dir", data, "--save_dir", save, *TINY_MODEL, *ONE_EPOCH, "--max_steps", "1"]) == 0
    assert sorted(savedir.read_vocab(save)[0]) == sorted(set(WORD_TEXT))
    assert savedir.read_vocab(word_models["uncapped"])[0] == WORDS
    # Each setting reads back its own cache, whatever ran in between.
    words = utils.TextLoader(data, 4, 10, word_level=True)
    characters = utils.TextLoader(data, 4, 10, word_level=False)
    assert words.vocab == WORDS and len(words.ids) == len(utils.split_words(WORD_TEXT))
    assert "".join(characters.vocab[i] for i in characters.ids) == WORD_TEXT
    assert len(glob.glob(os.path.join(data, utils.CACHE_PREFIX + "*.vocab.json"))) == 3  # capped, words, chars


# ----------------------------------------------------------------------------------------------------------
# Word level: the spaces around line breaks, compared exactly (splitting on whitespace would hide an extra one)


@pytest.mark.parametrize("text", ["a b\nc d", "a b\n\nc d\n", "\na b", "a\n\n"])
def test_word_text_round_trips_with_no_space_on_either_side_of_a_line_break(text):
    assert utils.join_tokens(utils.tokenize(text, word_level=True), word_level=True) == text


# Words the sampler makes after each prime, and the text sample.py prints for them.
SPACED_WORDS = ["\n", "the", "cat", "\n", "\n", "sat", "on", "\n", "the"]
SPACED_TEXTS = {"the": "the\nthe cat\n\nsat on\nthe", "the\n": "the\n\nthe cat\n\nsat on\nthe",
                "": "\nthe cat\n\nsat on\nthe"}


@pytest.mark.parametrize("prime", SPACED_TEXTS)
def test_sampled_words_get_no_space_beside_a_line_break_after_the_prime_or_between_blocks(word_models, prime):
    sampler = Sampler.load(word_models["uncapped"])
    ids = [sampler.index[word] for word in SPACED_WORDS]
    assert sampler.join(prime, SPACED_WORDS) == SPACED_TEXTS[prime]
    for cut in range(1, len(ids)):  # two blocks, cut before and after each line break
        text = SampleText(sampler, prime)
        assert prime + text.add(ids[:cut]) + text.add(ids[cut:]) + text.rest() == SPACED_TEXTS[prime], cut


# ----------------------------------------------------------------------------------------------------------
# word2vec embeddings


@pytest.mark.parametrize("file_format", FORMATS)
def test_embedding_rows_are_set_by_word_in_every_format(vector_files, file_format, capsys):
    vectors, paths = vector_files
    vocab = list(reversed(WORDS))  # another order than the vectors': rows must follow the words
    matrix = embeddings.embedding_matrix(paths[file_format], vocab, seed=7)
    assert matrix.shape == (len(vocab), VECTOR_SIZE) and matrix.dtype == np.float32
    for word, vector in vectors.items():
        np.testing.assert_array_equal(matrix[vocab.index(word)], vector)
    assert MISSING_MESSAGE in capsys.readouterr().out
    # Words without a vector start random, at the vectors' scale, the same for the same seed.
    random_rows = matrix[[vocab.index(word) for word in WITHOUT_VECTOR]]
    scale = np.std(np.stack(list(vectors.values())))
    assert 0.2 * scale < np.std(random_rows) < 5 * scale
    np.testing.assert_array_equal(embeddings.embedding_matrix(paths[file_format], vocab, seed=7), matrix)


def test_character_level_vectors_set_character_rows(tmp_path):
    from gensim.models import KeyedVectors
    characters = sorted(set(WORD_TEXT) - set(" \n"))  # the word2vec text format cannot hold whitespace keys
    vectors = KeyedVectors(vector_size=3)
    vectors.add_vectors(characters, np.arange(len(characters) * 3, dtype=np.float32).reshape(-1, 3))
    path = str(tmp_path / "chars.txt")
    vectors.save_word2vec_format(path)
    loader = utils.TextLoader(make_data_dir(tmp_path / "data", WORD_TEXT), 4, 10)
    matrix = embeddings.embedding_matrix(path, loader.vocab, seed=1)
    for character in characters:
        np.testing.assert_array_equal(matrix[loader.vocab.index(character)], vectors[character])


def test_training_starts_from_the_vectors_with_their_own_size_and_samples(word_models, vector_files, tmp_path,
                                                                          capsys):
    vectors, paths = vector_files
    save = str(tmp_path / "save")
    capsys.readouterr()
    assert train_words(word_models["data"], save, "--word2vec_embedding", paths["word2vec.bin"],
                       "--learning_rate", TINY_LEARNING_RATE, "--max_steps", "1") == 0
    assert MISSING_MESSAGE in capsys.readouterr().out
    loaded = savedir.load(save)
    assert loaded.model_config.embedding_size == VECTOR_SIZE and loaded.model_config.rnn_size == RNN_SIZE
    embedding = loaded.model.embedding.embeddings.numpy()
    assert embedding.shape == (len(WORDS), VECTOR_SIZE)
    for word, vector in vectors.items():  # after one step at the tiny learning rate: still the vectors
        np.testing.assert_allclose(embedding[loaded.vocab.index(word)], vector, atol=1e-6)
    assert sample.main(["--save_dir", save, "-n", "20", "--prime", "the cat", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the cat ")


def test_init_from_reports_word2vec_embedding_ignored(word_models, vector_files, tmp_path, capsys):
    _, paths = vector_files
    save = str(tmp_path / "resumed")
    capsys.readouterr()
    assert train_words(word_models["data"], save, "--max_vocab", CAP, "--init_from", word_models["capped"],
                       "--word2vec_embedding", paths["word2vec.bin"], "--num_epochs", "2") == 0
    assert "--word2vec_embedding ignored" in capsys.readouterr().err
    # The resumed model keeps its own embedding (the width of rnn_size, not of the vectors).
    assert savedir.read_config(save)["embedding_size"] == RNN_SIZE


# Files that are not usable word vectors, by name (None: the file does not exist).
BAD_VECTOR_FILES = {
    "missing.bin": None,
    "empty.txt": b"",
    "random.bin": np.random.default_rng(0).bytes(4096),
    "text.txt": b"Just some text.\nNot word vectors.\n",
    "dict.pkl": pickle.dumps({"the": [0.1, 0.2]}, protocol=4),
    # A gensim 3 era save: an object of a class path gensim 4 no longer has (written by hand: PROTO 2,
    # GLOBAL, EMPTY_TUPLE, NEWOBJ, EMPTY_DICT, BUILD, STOP).
    "gensim3.model": b"\x80\x02cgensim.models.deprecated.word2vec\nWord2Vec\n)\x81}b.",
    # A class gensim 4 has, with a state it cannot use.
    "broken.kv": b"\x80\x02cgensim.models.keyedvectors\nKeyedVectors\n)\x81}b.",
}


def bad_vector_file(directory, name):
    """Write BAD_VECTOR_FILES[name] into `directory`; returns its path."""
    path = os.path.join(directory, name)
    if BAD_VECTOR_FILES[name] is not None:
        with open(path, "wb") as f:
            f.write(BAD_VECTOR_FILES[name])
    return path


@pytest.mark.parametrize("name", BAD_VECTOR_FILES)
def test_unusable_vector_file_is_one_line_error_and_writes_nothing(word_models, tmp_path, capsys, name):
    path = bad_vector_file(tmp_path, name)
    save = str(tmp_path / "save")
    capsys.readouterr()
    code = train_words(word_models["data"], save, "--word2vec_embedding", path)
    err = capsys.readouterr().err
    assert code in (1, 2)
    assert err.startswith("error: ") and err.count("\n") == 1 and name in err
    assert not os.path.exists(save)


@pytest.mark.slow
def test_gensim3_save_error_from_the_command_line(word_models, tmp_path):
    path = bad_vector_file(tmp_path, "gensim3.model")
    result = run_script("train.py", "--data_dir", word_models["data"], "--save_dir", tmp_path / "save",
                        "--word_level", *TINY_MODEL, "--word2vec_embedding", path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "older gensim" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------------
# Word level: sampling mode 2 and evaluation with <unk>


def test_word_level_sample_mode_2_is_mode_1(word_models):
    sampler = Sampler.load(word_models["uncapped"])
    differs_from_argmax = False
    for seed in (1, 2, 3):
        sampled = sampler.sample("the", 60, mode=1, seed=seed)
        assert sampler.sample("the", 60, mode=2, seed=seed) == sampled
        differs_from_argmax |= sampled != sampler.sample("the", 60, mode=0, seed=seed)
    assert differs_from_argmax  # mode 2 samples: it is not argmax at every word


def words_json(capsys, *args):
    capsys.readouterr()
    assert evaluate.main([*map(str, args), "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


UNSEEN_TEXT = "the zebra sat on the dog.\nthe cat sat on a mat\n\nthe end"


@pytest.mark.parametrize("model_name", ["capped", "min_count"])
def test_evaluate_counts_unknown_words_as_unk(word_models, min_count_model, tmp_path, capsys, model_name):
    save = word_models["capped"] if model_name == "capped" else min_count_model
    loaded = savedir.load(save)
    assert loaded.unk_token == utils.UNK_TOKEN
    words = utils.split_words(UNSEEN_TEXT)
    ids = [loaded.vocab.index(w) if w in loaded.vocab else loaded.vocab.index(utils.UNK_TOKEN) for w in words]
    assert sum(loaded.vocab[i] == utils.UNK_TOKEN for i in ids) >= 5  # zebra, dog., a, mat, end
    path = tmp_path / "unseen.txt"
    path.write_text(UNSEEN_TEXT, encoding="utf-8")
    measured = words_json(capsys, "--save_dir", save, "--text", path)
    expected, count = reference_loss(loaded.model, ids, evaluation.EVAL_STREAMS)
    assert measured["tokens"] == count == len(words) - 1
    assert measured["loss_nats"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("model_name", ["capped", "min_count", "uncapped"])
def test_evaluate_validation_split_of_a_word_model(word_models, min_count_model, capsys, model_name):
    # The split is rebuilt with the model's own --max_vocab and --min_count: the same vocabulary, the same tail.
    save = min_count_model if model_name == "min_count" else word_models[model_name]
    loaded = savedir.load(save)
    words = utils.split_words(WORD_TEXT)
    tail = words[len(words) - int(len(words) * 0.05):]
    unk = loaded.vocab.index(loaded.unk_token) if loaded.unk_token else None
    ids = [loaded.vocab.index(w) if w in loaded.vocab else unk for w in tail]
    measured = words_json(capsys, "--save_dir", save)
    expected, count = reference_loss(loaded.model, ids, evaluation.EVAL_STREAMS)
    assert measured["tokens"] == count == len(tail) - 1
    assert measured["loss_nats"] == pytest.approx(expected, rel=1e-4)


def test_vectors_sharing_no_token_with_the_vocabulary_are_refused(vector_files):
    _, paths = vector_files
    with pytest.raises(ValueError, match=r"none of the 3 tokens of this text has a vector in .*word2vec\.txt"):
        embeddings.embedding_matrix(paths["word2vec.txt"], ["zebra", "lion", utils.UNK_TOKEN], seed=1)
    # One shared word is enough.
    matrix = embeddings.embedding_matrix(paths["word2vec.txt"], ["zebra", "cat"], seed=1)
    np.testing.assert_array_equal(matrix[1], vector_files[0]["cat"])
