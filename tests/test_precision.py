"""train.py --precision: what auto picks, bfloat16 products against float32's, and checkpoints that a run of either
precision resumes and samples."""
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

import precision
import sample
import savedir
import train
import unrolled
from conftest import newest_step, train_flags
from model import CharRNN
from settings import ModelConfig

AMX = ("amx_bf16",)


@pytest.mark.parametrize("requested, rnn_size, flags, on_gpu, expected", [
    ("auto", precision.AUTO_MIN_RNN_SIZE, AMX, False, "bfloat16"),
    ("auto", 512, ("avx512_bf16",), False, "bfloat16"),
    ("auto", 128, AMX, False, "bfloat16"),  # the default size gains too (docs/performance.md)
    ("auto", precision.AUTO_MIN_RNN_SIZE - 1, AMX, False, "float32"),  # smaller than measured
    ("auto", 512, (), False, "float32"),  # no bfloat16 units: casts only cost
    ("auto", 512, AMX, True, "float32"),
    ("float32", 512, AMX, False, "float32"),
    ("bfloat16", 16, (), False, "bfloat16"),  # asked for: runs anywhere, in software where it must
])
def test_auto_picks_bfloat16_only_on_bfloat16_hardware_at_the_measured_size(requested, rnn_size, flags, on_gpu,
                                                                            expected):
    assert precision.choose(requested, rnn_size, on_gpu=on_gpu, cpu_flags=flags)[0] == expected


def test_the_cpu_flags_come_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert precision.cpu_bfloat16_flags(str(cpuinfo)) == ("avx512_bf16",)
    assert precision.cpu_bfloat16_flags(str(tmp_path / "none")) == ()


def pair(cell):
    """A float32 CharRNN and a bfloat16 one with the same weights (the same for every run of the test)."""
    keras.utils.set_random_seed(0)
    config = ModelConfig(20, cell, 32, 2)
    float32, bfloat16 = CharRNN(config), CharRNN(config, precision="bfloat16")
    for model in (float32, bfloat16):
        model.build_weights()
    for a, b in zip(float32.weights, bfloat16.weights):
        b.assign(a)
    return float32, bfloat16


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("steps", [20, unrolled.UNROLL_MAX_STEPS + 1])  # the unrolled path, then Keras' layers
def test_bfloat16_training_products_are_float32_s_within_bfloat16_rounding(cell, steps):
    float32, bfloat16 = pair(cell)
    ids = np.random.RandomState(0).randint(0, 20, (4, steps + 1))
    inputs, targets, states = tf.constant(ids[:, :-1]), tf.constant(ids[:, 1:]), float32.zero_state(4)
    loss, grads, new_states = unrolled.loss_and_gradients(float32, inputs, targets, states)
    loss16, grads16, new_states16 = unrolled.loss_and_gradients(bfloat16, inputs, targets, states)
    grads, grads16 = ([tf.convert_to_tensor(g) for g in gradients] for gradients in (grads, grads16))  # no slices
    assert loss16.dtype == tf.float32 and {t.dtype for t in (*grads16, *new_states16)} == {tf.float32}
    assert float(loss16) == pytest.approx(float(loss), rel=1e-2)
    # bfloat16 keeps 8 bits of mantissa: about 0.4% of each product. Unrolled, only the products are bfloat16; Keras'
    # mixed_bfloat16 layers run the whole recurrence in it, whose rounding adds up over the 101 steps.
    tolerance = 0.05 if steps <= unrolled.UNROLL_MAX_STEPS else 0.2
    for g, g16 in zip(grads, grads16):
        np.testing.assert_allclose(g16, g, atol=tolerance * float(tf.reduce_max(tf.abs(g))) + 1e-6)
    assert any(not np.array_equal(g, g16) for g, g16 in zip(grads, grads16))  # the products did change
    assert {w.dtype for w in bfloat16.weights} == {"float32"}


def checkpoint_dtypes(save_dir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(save_dir))
    return {key: dtype for key, dtype in reader.get_variable_to_dtype_map().items()
            if not key.startswith(("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter"))}


def test_a_bfloat16_run_resumes_in_float32_and_back_and_samples(tmp_path, data_dir, capsys):
    """The checkpoints of either precision hold the same float32 variables; config.yaml records what ran."""
    save, plain = str(tmp_path / "save"), str(tmp_path / "plain")
    assert train.main(train_flags(data_dir, plain, "--max_steps", 5)) == 0
    assert "precision float32 (auto: " in capsys.readouterr().out  # a 16-unit model
    assert savedir.read_config(plain)["precision"] == "float32"
    for steps, run_precision in ((10, "bfloat16"), (20, "float32"), (30, "bfloat16")):
        resume = ["--init_from", save] if steps > 10 else []
        assert train.main(train_flags(data_dir, save, "--precision", run_precision, "--max_steps", steps,
                                      *resume)) == 0
        assert newest_step(save) == steps
        assert savedir.read_config(save)["precision"] == run_precision
        assert checkpoint_dtypes(save) == checkpoint_dtypes(plain)
        assert set(checkpoint_dtypes(save).values()) <= {tf.float32, tf.int64, tf.float64}
    capsys.readouterr()
    assert sample.main(["--save_dir", save, "-n", "40", "--seed", "3", "--prime", "the"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the") and len(text) > 40


def test_an_unknown_precision_is_one_line(tmp_path, data_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_flags(data_dir, str(tmp_path / "save"), "--precision", "float16"))
    assert exit_info.value.code == 2
    assert "argument --precision: invalid choice: 'float16'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "save")
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        precision.choose("half", 128)
