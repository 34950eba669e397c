"""bench/gpu.py, the GPU yardstick: it runs without a GPU too (its GPU figures skipped, its CPU figures measured)
and refuses bad input in one line; its checks of the GPU (the training path, the losses against the CPU's, mirrored
against one device, the GPU's checkpoint resumed and sampled on the CPU) run where a GPU is, and are skipped,
saying so, where none is."""
import json
import math
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import REPO, TINY_TEXT

BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, BENCH)
import gpu  # noqa: E402

sys.path.remove(BENCH)  # bench/analyze.py and bench/export.py must not shadow the scripts of those names later

HAS_GPU = bool(tf.config.list_physical_devices("GPU"))
NEEDS_GPU = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU: TensorFlow finds none on this machine (bench/gpu.py "
                                                   "--quick checks the CPU side here)")
# 20,160 characters (the training timer's six batches of 50 x 50), with the T of sample.py's prime "The"
TEXT = "The cat sat on the mat.\nThe dog sat on the log.\n" * 420
STEPS = 20  # train.py steps compared between the devices, as the bench does


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def run_bench(*args, timeout=240):
    return subprocess.run([sys.executable, os.path.join(BENCH, "gpu.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def bench_for(tmp_path, text_file, *flags):
    """A gpu.Bench of --quick's settings (and `flags`) over a copy of text_file, as main makes one."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "input.txt").write_text(TEXT, encoding="utf-8")
    args = gpu.parse_args(["--quick", "--data", text_file, *flags])
    return gpu.Bench(args, str(tmp_path), str(data_dir), None if HAS_GPU else "no GPU found")


def figures(capsys):
    """The figures a part printed: {(name, tf32 or None): line}."""
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {(line["figure"], line.get("tf32")): line for line in lines}


@pytest.mark.slow
def test_quick_run_measures_the_cpu_and_skips_the_gpu_figures_without_a_gpu(text_file):
    result = run_bench("--quick", "--data", text_file)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON
    assert lines[0]["figure"] == "devices" and lines[0]["tensorflow"] == tf.__version__
    by_name = {}
    for line in lines[1:]:
        by_name.setdefault(line["figure"], []).append(line)
    cpu = lambda name: [line for line in by_name[name] if line.get("device") == "cpu"]
    assert {(line["size"], line["precision"]) for line in cpu("train_tokens_per_s")} == {
        ("1x32", "float32"), ("1x32", "bfloat16")}
    for name in ("train_tokens_per_s", "train_bfloat16_over_float32", "sample_chars_per_s", "sample_py_n500_s",
                 "sample_py_n500_first_s", "server_requests_per_s", "server_batching_ratio"):
        assert cpu(name) and all(line["value"] > 0 for line in cpu(name)), name
    assert all(line["path"] == "unrolled" for line in cpu("training_path"))
    assert math.isfinite(cpu("train_losses")[0]["value"]) and cpu("train_losses")[0]["steps"] == 3 + gpu.RESUME_STEPS
    gpu_side = [line for line in lines[1:] if line.get("device") == "gpu" or line["figure"].endswith("_gpu_over_cpu")]
    assert {line["figure"] for line in gpu_side} == {
        "training_path", "train_tokens_per_s", "train_gpu_over_cpu", "train_bfloat16_over_float32", "loss_agreement",
        "mirrored_agreement", "checkpoint_resumes_on_cpu", "checkpoint_samples_on_cpu", "sample_chars_per_s",
        "sample_py_n500_s", "sample_py_n500_first_s", "sample_gpu_over_cpu", "server_requests_per_s",
        "server_batching_ratio"}
    if HAS_GPU:
        assert lines[0]["gpus"] and all("skipped" not in line and "error" not in line for line in gpu_side)
        assert all(line["ok"] for line in gpu_side if "ok" in line)
    else:
        assert lines[0]["gpus"] == [] and lines[0]["note"].startswith("no GPU found")
        assert all(line["skipped"].startswith("no GPU found") and "value" not in line for line in gpu_side)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: '0' is not a positive integer"),
    (["--sizes", "3by128"], "error: --sizes '3by128': give LAYERSxUNITS sizes"),
    (["--parts", "train,gpu"], "error: unknown part 'gpu': choose from train, agree, sample, server"),
    (["--precisions", "float16"], "error: unknown precision 'float16'"),
])
def test_a_bad_flag_exits_2_with_the_reason_on_the_last_line(text_file, args, message):
    result = run_bench("--data", text_file, *args, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1]  # after argparse's usage line, for its own refusals
    if message.startswith("error: "):  # refused by the bench: one line only
        assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_missing_or_too_short_text_or_one_without_the_prime_is_one_line(tmp_path):
    short, lower_case = tmp_path / "short.txt", tmp_path / "lower.txt"
    short.write_text(TINY_TEXT, encoding="utf-8")
    lower_case.write_text(TINY_TEXT * 7, encoding="utf-8")
    for path, code, message in ((tmp_path / "missing.txt", 1, "No such file or directory"),
                                (short, 2, "characters: the training timer needs 15,000"),
                                (lower_case, 2, "has no 'T': sample.py and bench/server.py prime the model")):
        result = run_bench("--quick", "--data", path, timeout=60)
        assert result.returncode == code
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
        assert result.stdout == ""


def test_agreement_is_the_largest_relative_difference_within_the_tolerance():
    reference = {1: 4.0, 2: 3.0, 3: 2.0}
    found = gpu.agreement({1: 4.0, 2: 3.0015, 3: 2.0005}, reference, range(1, 4), 1e-3)
    assert found["value"] == pytest.approx(5e-4) and found["worst_step"] == 2 and found["first_step_rel_diff"] == 0
    assert found["ok"] and found["steps"] == "1-3"
    assert not gpu.agreement({1: 4.0, 2: 3.01, 3: 2.0}, reference, range(1, 4), 1e-3)["ok"]
    with pytest.raises(ValueError, match="no training loss at step 3"):
        gpu.agreement({1: 4.0, 2: 3.0}, reference, range(1, 4), 1e-3)


PATHS_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import gpu
import cli
cli.quiet_tensorflow()
from model import CharRNN
from settings import ModelConfig
print(json.dumps({f"{cell} {steps}": gpu.training_path(CharRNN(ModelConfig(20, cell, 16, 2)), 4, steps)
                  for cell in ("lstm", "gru", "rnn") for steps in (50, 101)}))
"""


def training_paths(device):
    """{"CELL STEPS": training_path's answer} for 2 x 16 networks of each cell type, batches of 4 x 50 and 4 x 101
    steps, in a child process on `device` (gpu.device_env)."""
    done = subprocess.run([sys.executable, "-c", PATHS_CHILD, BENCH], env=gpu.device_env(device), capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_on_the_cpu_the_training_step_is_unrolled_up_to_100_steps_then_keras_loop():
    for name, found in training_paths("cpu").items():
        if name.endswith(" 50"):
            assert found["path"] == "unrolled" and "unrolled.applies" in found["why"], name
        else:
            assert found == {"path": "keras_loop", "why": "no GPU visible (Keras' cudnn_ok asks for one)"}, name


@NEEDS_GPU
def test_on_the_gpu_lstm_and_gru_train_with_cudnn_and_simple_rnn_with_keras_loop():
    for name, found in training_paths("gpu").items():
        if name.startswith("rnn"):
            assert found == {"path": "keras_loop", "why": "Keras has no cuDNN kernel for SimpleRNN"}, name
        else:
            assert found["path"] == "cudnn" and "CudnnRNN" in found["why"], (name, found)


@NEEDS_GPU
def test_gpu_losses_match_the_cpu_s_and_mirrored_matches_one_device(tmp_path, text_file):
    bench = bench_for(tmp_path, text_file, "--agree_steps", STEPS)
    _, reference = gpu.train_run(bench, "cpu", "cpu", STEPS)
    _, on_gpu = gpu.train_run(bench, "gpu", "gpu", STEPS, tf32=False)
    _, mirrored = gpu.train_run(bench, "gpu", "gpu-mirrored", STEPS, "--strategy", "mirrored", tf32=False)
    steps = range(1, STEPS + 1)
    assert gpu.agreement(on_gpu, reference, steps, gpu.REL_TOLERANCE)["ok"], (on_gpu, reference)
    assert gpu.agreement(mirrored, on_gpu, steps, gpu.REL_TOLERANCE)["ok"], (mirrored, on_gpu)


@NEEDS_GPU
def test_the_gpu_s_checkpoint_resumes_and_samples_on_the_cpu(tmp_path, text_file, capsys):
    bench = bench_for(tmp_path, text_file, "--agree_steps", STEPS)
    _, reference = gpu.train_run(bench, "cpu", "cpu", STEPS + gpu.RESUME_STEPS)
    save_dir, _ = gpu.train_run(bench, "gpu", "gpu", STEPS, tf32=False)
    gpu.checkpoint_moves(bench, gpu.Report(), save_dir, reference, STEPS)
    found = figures(capsys)
    assert found[("checkpoint_resumes_on_cpu", None)]["ok"], found
    assert found[("checkpoint_samples_on_cpu", None)]["ok"], found


@pytest.mark.slow
def test_the_checkpoint_check_resumes_and_samples_a_cpu_checkpoint_in_the_gpu_s_place(tmp_path, text_file, capsys):
    """The plumbing of the check above, here without a GPU: a CPU run's checkpoint in place of the GPU's resumes
    with the uninterrupted run's losses, and samples."""
    bench = bench_for(tmp_path, text_file)
    _, reference = gpu.train_run(bench, "cpu", "cpu", 3 + gpu.RESUME_STEPS)
    save_dir, _ = gpu.train_run(bench, "cpu", "cpu-at-3", 3)
    report = gpu.Report()
    gpu.checkpoint_moves(bench, report, save_dir, reference, 3)
    found = figures(capsys)
    assert found[("checkpoint_resumes_on_cpu", None)]["steps"] == f"4-{3 + gpu.RESUME_STEPS}"
    assert found[("checkpoint_resumes_on_cpu", None)]["value"] <= 1e-6, found
    assert found[("checkpoint_samples_on_cpu", None)]["chars"] >= 200 and not report.failed, found
