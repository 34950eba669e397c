"""GPU yardstick: the training path a GPU takes, and training, sampling and serving on the GPU against its CPU, one
JSON line per figure.

usage: python bench/gpu.py --data ../shared/data/tinyshakespeare/input.txt           # a few minutes with a GPU
       python bench/gpu.py --data ... --quick       # tiny sizes: that every part runs (under a minute on 2 cores)
       python bench/gpu.py --data ... --parts train,agree --sizes 3x128        # some parts, one size

The first line names the devices found (the GPUs with their compute capability, the CUDA and cuDNN versions this
TensorFlow was built for); without a GPU it says so and why, every GPU figure is a line marked "skipped" with the
reason, and the CPU figures are still measured, so that a machine without one checks that the bench runs.

What runs on the CPU runs in a child process with CUDA_VISIBLE_DEVICES empty: TensorFlow there sees no GPU and
trains exactly as on a machine without one (model.py's unrolled path included). tf.device("/CPU:0") in one
process would not: unrolled.applies and Keras' cudnn_ok would still see the GPU, and place cuDNN ops on the CPU.
The GPU's children take GPU memory as they need it (TF_FORCE_GPU_ALLOW_GROWTH), so two servers share it.

Parts (--parts, all by default; docs/gpu.md says what each line means):
  train   for each of --sizes and --precisions: the training path (unrolled, cuDNN, or Keras' loop and why, read
          from the traced training step) and tokens/s (bench/speed.py's timer, --steps steps), on each device
  agree   train.py for --agree_steps steps (float32, --seed 1, one loss a step in metrics.csv) on the CPU, on the
          GPU with TF32 off and on, and with --strategy mirrored on the GPU: the GPU's losses against the CPU's,
          mirrored against one device; then the GPU's checkpoint resumes on the CPU for RESUME_STEPS steps (its
          losses against the CPU run's) and sample.py on the CPU samples from it
  sample  sample.py's chars/s at -n --sample_n (the wall time of -n 10 taken from that of -n sample_n + 10, as
          bench/long_samples.py does) and the wall time of a one-off `sample.py -n 500`, on each device
  server  bench/server.py's batching server against batching off (--max_batch 0) at --clients, on each device

Exits 1, after a line on stderr naming them, when a figure failed (an error, or a check whose "ok" is false).
"""
import argparse
import csv
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, REPO)

import cli  # noqa: E402
import long_samples  # noqa: E402
from precision import BFLOAT16, FLOAT32, cpu_bfloat16_flags  # noqa: E402
from server import client_counts  # noqa: E402
from settings import SampleSettings  # noqa: E402
from speed import DEFAULT_SIZE, default_loader, parse_sizes, train_speed  # noqa: E402

DEVICES = ("gpu", "cpu")
PARTS = ("train", "agree", "sample", "server")
SEED = 1
# Per step, |loss - reference| / reference. Both runs are float32, but the CPU runs the unrolled graph (oneDNN's
# products, deferred gradients) and the GPU cuDNN's fused kernels: the sums run in other orders, a few units in
# the 7th digit per op, and Adam carries them through the steps. A real fault (a gate out of order, a state not
# carried, a bias split wrongly) moves the loss by far more than 1e-3 (0.004 nats at 4 nats a token).
REL_TOLERANCE = 1e-3
# With TF32 (TensorFlow's default on Ampere and later GPUs), float32 products round their operands to 10 bits
# of mantissa (a relative 5e-4 each): a looser bar, for a figure that says how far train.py's default drifts.
TF32_REL_TOLERANCE = 1e-2
PRIME = SampleSettings().prime  # sample.py's default prime, and bench/server.py's
RESUME_STEPS = 5  # steps the GPU's checkpoint is trained on the CPU after the resume
CHILD_TIMEOUT_S = 900
# --quick: tiny sizes and counts (train.py's agreement runs also at batch 10 x 10), to check that every part runs.
QUICK = {"sizes": "1x32", "steps": 3, "agree_steps": 3, "sample_n": 1_000_000, "one_off_runs": 1, "clients": "2,4",
         "server_seconds": 0.5, "request_n": 20}
QUICK_BATCH = ["--batch_size", "10", "--seq_length", "10"]
# bench/speed.py's timer warms up on 5 batches of train.py's default 50 x 50 before its timed steps.
MIN_CHARS = 6 * 50 * 50


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a UTF-8 text of at least 15,000 characters (tinyshakespeare)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes and counts, to check that every part runs (flags given beside it win): "
                             f"{', '.join(f'--{name} {value}' for name, value in QUICK.items())}")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run, of {PARTS}")
    parser.add_argument("--sizes", default=f"{DEFAULT_SIZE},2x512",
                        help="comma-separated LSTM sizes, LAYERSxUNITS, to time training at; the first (train.py's "
                             "default) is also the model of the agree, sample and server parts")
    parser.add_argument("--precisions", default=f"{FLOAT32},{BFLOAT16}", help="comma-separated training precisions")
    parser.add_argument("--steps", type=cli.positive_int, default=50,
                        help="timed training steps per size and precision")
    parser.add_argument("--agree_steps", type=cli.positive_int, default=20,
                        help="train.py steps whose losses are compared between the devices")
    parser.add_argument("--sample_n", type=cli.positive_int, default=200_000, help="tokens whose sampling is timed")
    parser.add_argument("--one_off_runs", type=cli.positive_int, default=3,
                        help="timed runs of `sample.py -n 500` per device (the median is reported)")
    parser.add_argument("--clients", type=client_counts, default="32,256",
                        help="comma-separated counts of concurrent clients of the server")
    parser.add_argument("--server_seconds", type=cli.positive_float, default=5.0, help="length of each measurement")
    parser.add_argument("--server_rounds", type=cli.positive_int, default=1, help="measurements per server and count")
    parser.add_argument("--request_n", type=cli.positive_int, default=200, help="tokens per server request")
    return parser


def parse_args(argv):
    """The flags, with QUICK's defaults under --quick; ValueError (one line) for a bad size, precision or part."""
    parser = build_parser()
    if parser.parse_args(argv).quick:
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.sizes = parse_sizes(args.sizes)
    args.precisions = args.precisions.split(",")
    args.parts = args.parts.split(",")
    for name, given, known in (("precision", args.precisions, (FLOAT32, BFLOAT16)), ("part", args.parts, PARTS)):
        unknown = [value for value in given if value not in known]
        if unknown:
            raise ValueError(f"unknown {name} {unknown[0]!r}: choose from {', '.join(known)}")
    return args


class Report:
    """Prints the figures, one JSON line each, and keeps the names of those that failed (an error, or ok false)."""

    def __init__(self):
        self.failed = []

    def figure(self, name, **fields):
        print(json.dumps({"figure": name, **fields}), flush=True)
        if "error" in fields or fields.get("ok") is False:
            self.failed.append(name)

    def error(self, name, error, **fields):
        self.figure(name, **fields, error=first_line(str(error)) or type(error).__name__)


# What a measurement that went wrong raises: a child that failed (ValueError), a server that did not start
# (RuntimeError), a child past its time (SubprocessError), a file not written (OSError).
FAILURES = (ValueError, RuntimeError, OSError, subprocess.SubprocessError)


@dataclasses.dataclass
class Bench:
    """What every part reads: the flags, this run's folder and data dir, and the GPUs found (or why none)."""
    args: argparse.Namespace
    work: str
    data_dir: str
    no_gpu: str | None  # why no GPU figure is measured; None when there is a GPU
    save_dir: str | None = None  # the sample and server parts' model, written once

    def skipped(self, report, name, **fields):
        report.figure(name, device="gpu", **fields, skipped=self.no_gpu)

    def model_flags(self):
        """train.py's flags for the agreement runs: the first --sizes, and batch 10 x 10 under --quick."""
        layers, units = self.args.sizes[0]
        return ["--num_layers", str(layers), "--rnn_size", str(units), *(QUICK_BATCH if self.args.quick else [])]


def first_line(text):
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def last_line(text):
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no message"


def device_env(device, tf32=True):
    """The environment of a child process run on `device` (see the module doc); tf32=False: cuBLAS and cuDNN
    multiply float32 in full float32 (NVIDIA_TF32_OVERRIDE=0), not TF32."""
    env = dict(os.environ, TF_FORCE_GPU_ALLOW_GROWTH="true")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if not tf32:
        env["NVIDIA_TF32_OVERRIDE"] = "0"
    return env


def run_child(command, env):
    """Run a command to its end; its stdout, or ValueError with its last line on stderr when it failed."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0:
        raise ValueError(f"{os.path.basename(command[1])} exited {done.returncode}: {last_line(done.stderr)}")
    return done.stdout


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ----------------------------------------------------------------------------------------------------------
# The devices


def devices(tf):
    """(the first line's fields: the GPUs, TensorFlow's CUDA and cuDNN build, the CPU; why no GPU figure is measured,
    or None when there is a GPU)."""
    gpus = tf.config.list_physical_devices("GPU")
    details = [tf.config.experimental.get_device_details(gpu) for gpu in gpus]
    build = tf.sysconfig.get_build_info()
    fields = {"gpus": [{"name": found.get("device_name", gpu.name),
                        "compute_capability": found.get("compute_capability")} for gpu, found in zip(gpus, details)],
              "tensorflow": tf.__version__, "cuda_build": build.get("cuda_version"),
              "cudnn_build": build.get("cudnn_version"), "cpu_cores": cli.usable_cores(),
              "cpu_bfloat16_flags": list(cpu_bfloat16_flags())}
    if gpus:
        return fields, None
    no_gpu = f"no GPU found ({why_no_gpu(build)})"
    fields["note"] = (f"{no_gpu}: the GPU figures are skipped. On a machine with an NVIDIA GPU run: "
                      f"python bench/gpu.py --data ../shared/data/tinyshakespeare/input.txt")
    return fields, no_gpu


def why_no_gpu(build):
    """The likeliest reason TensorFlow found no GPU, for the first line."""
    if not build.get("is_cuda_build"):
        return "this TensorFlow was built without CUDA"
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides the GPUs"
    if os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi"):
        return ("an NVIDIA device is present but TensorFlow cannot use it: are its CUDA libraries installed? "
                "pip install 'tensorflow[and-cuda]' of the same version; CHAR_RNN_VERBOSE=1 shows TensorFlow's log")
    return "no NVIDIA GPU on this machine"


# ----------------------------------------------------------------------------------------------------------
# train: the path and tokens/s

TRAIN_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import gpu
gpu.time_training(*sys.argv[2:])
"""


def time_training(data_dir, sizes, precisions, steps):
    """In a child process: for each size and precision, one JSON line with the training path and bench/speed.py's
    tokens/s, or the error that stopped them."""
    cli.quiet_tensorflow(one_thread_per_op=True)
    from model import CharRNN
    from settings import ModelConfig

    vocab_size = default_loader(data_dir).vocab_size
    for layers, units in parse_sizes(sizes):
        for precision in precisions.split(","):
            line = {"size": f"{layers}x{units}", "precision": precision}
            # A device without a kernel for this dtype fails here with TensorFlow's own errors: a finding to
            # report, and the other sizes and precisions are still timed.
            try:
                line.update(training_path(CharRNN(ModelConfig(vocab_size, "lstm", units, layers), precision)))
                timer, _ = train_speed(data_dir, "lstm", layers, units, precision)
                line["tokens_per_s"] = round(timer(int(steps)), 1)
            except Exception as error:
                line["error"] = f"{type(error).__name__}: {first_line(str(error))}"
            print(json.dumps(line), flush=True)


def training_path(model, batch=50, steps=50):
    """{"path", "why"}: how the training step (unrolled.loss_and_gradients) runs `model` on a batch of this shape on
    this process's devices: "unrolled" (unrolled.py), "cudnn" (Keras' layers, their graph holding CudnnRNN ops), or
    "keras_loop" (the layers' own loop), with the reason read from unrolled.applies and Keras' cudnn_ok."""
    import tensorflow as tf
    from keras.src.backend.tensorflow.rnn import cudnn_ok

    import unrolled

    model.build_weights()
    ids = tf.zeros([batch, steps], tf.int32)
    if unrolled.applies(model, ids):
        return {"path": "unrolled", "why": f"no GPU visible and a static sequence of {steps} steps (at most "
                                           f"{unrolled.UNROLL_MAX_STEPS}): unrolled.applies"}
    step = tf.function(lambda x, y: unrolled.loss_and_gradients(model, x, y, model.zero_state(batch))[0])
    graph = step.get_concrete_function(ids, ids).graph.as_graph_def()
    ops = {node.op for node in graph.node} | {node.op for f in graph.library.function for node in f.node_def}
    cudnn = sorted(op for op in ops if op.startswith("CudnnRNN"))
    if cudnn:
        return {"path": "cudnn", "why": f"the layers' training graph holds {', '.join(cudnn)}"}
    cell = model.rnn_layers[0].cell
    if not tf.config.list_logical_devices("GPU"):
        why = "no GPU visible (Keras' cudnn_ok asks for one)"
    elif model.cell_type == "rnn":
        why = "Keras has no cuDNN kernel for SimpleRNN"
    elif not cudnn_ok(cell.activation, cell.recurrent_activation, False, cell.use_bias):
        why = "Keras' cudnn_ok refuses the layer's activations or bias"
    else:
        why = "cudnn_ok allows it, but Keras' cuDNN call raised NotImplementedError (for this dtype?)"
    return {"path": "keras_loop", "why": why}


def train_part(bench, report):
    """Training path and tokens/s for every size and precision, on each device, and the GPU's over the CPU's."""
    args = bench.args
    combinations = [(f"{layers}x{units}", precision) for layers, units in args.sizes for precision in args.precisions]
    rates = {}
    for device in DEVICES:
        if device == "gpu" and bench.no_gpu:
            for size, precision in combinations:
                for name in ("training_path", "train_tokens_per_s"):
                    bench.skipped(report, name, size=size, precision=precision)
            continue
        command = [sys.executable, "-c", TRAIN_CHILD, BENCH, bench.data_dir,
                   ",".join(f"{layers}x{units}" for layers, units in args.sizes), ",".join(args.precisions),
                   str(args.steps)]
        try:
            out = run_child(command, device_env(device))
            lines = {(line["size"], line["precision"]): line for line in json_lines(out)}
        except FAILURES as error:
            lines = {combination: {"error": str(error)} for combination in combinations}
        for size, precision in combinations:
            line = lines.get((size, precision), {"error": "the child printed no line for it"})
            where = {"device": device, "size": size, "precision": precision}
            if "path" in line:
                report.figure("training_path", **where, path=line["path"], why=line["why"])
            else:
                report.error("training_path", line["error"], **where)
            if "tokens_per_s" in line:
                rates[(device, size, precision)] = line["tokens_per_s"]
                report.figure("train_tokens_per_s", **where, value=line["tokens_per_s"])
            else:
                report.error("train_tokens_per_s", line["error"], **where)
    for size, precision in combinations:
        ratio(bench, report, "train_gpu_over_cpu", rates, (size, precision), size=size, precision=precision)
    if args.precisions == [FLOAT32, BFLOAT16]:
        precision_ratios(bench, report, rates)


def precision_ratios(bench, report, rates):
    """bfloat16's tokens/s over float32's, on each device and size where both were measured."""
    for device in DEVICES:
        for layers, units in bench.args.sizes:
            where = {"device": device, "size": f"{layers}x{units}"}
            pair = [rates.get((device, where["size"], precision)) for precision in (BFLOAT16, FLOAT32)]
            if device == "gpu" and bench.no_gpu:
                bench.skipped(report, "train_bfloat16_over_float32", size=where["size"])
            elif None in pair:
                report.figure("train_bfloat16_over_float32", **where, error="a precision's figure is missing")
            else:
                report.figure("train_bfloat16_over_float32", **where, value=round(pair[0] / pair[1], 2))


def ratio(bench, report, name, rates, key, **fields):
    """The GPU's figure over the CPU's, where both were measured."""
    if bench.no_gpu:
        report.figure(name, **fields, skipped=bench.no_gpu)
    elif ("gpu", *key) in rates and ("cpu", *key) in rates:
        report.figure(name, **fields, value=round(rates[("gpu", *key)] / rates[("cpu", *key)], 2))
    else:
        report.figure(name, **fields, error="a device's figure is missing (see its line)")


# ----------------------------------------------------------------------------------------------------------
# agree: the same losses on both devices, and the GPU's checkpoint on the CPU


def train_run(bench, device, name, steps, *flags, tf32=True):
    """train.py on `device` until step `steps` (float32, seed 1, a loss every step): (its save dir, {step: loss})."""
    save_dir = os.path.join(bench.work, "runs", name)
    run_child([sys.executable, os.path.join(REPO, "train.py"), "--data_dir", bench.data_dir, "--save_dir", save_dir,
               "--max_steps", str(steps), "--print_every", "1", "--sample_every", "-1", "--seed", str(SEED),
               "--precision", FLOAT32, *bench.model_flags(), *flags], device_env(device, tf32))
    return save_dir, train_losses(save_dir)


def train_losses(save_dir):
    """{step: training loss} of a save dir's metrics.csv."""
    with open(os.path.join(save_dir, "metrics.csv"), newline="") as f:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(f) if row["train_loss"]}


def agreement(losses, reference, steps, tolerance):
    """The figure's fields: the largest relative difference of `losses` from `reference` over `steps` (a range),
    the step where it is, that of the first step, and whether it is within `tolerance`."""
    missing = [step for step in steps if step not in losses or step not in reference]
    if missing:
        raise ValueError(f"no training loss at step {missing[0]} in metrics.csv")
    differences = {step: abs(losses[step] - reference[step]) / abs(reference[step]) for step in steps}
    worst = max(differences, key=differences.get)
    return {"steps": f"{steps[0]}-{steps[-1]}", "value": float(f"{differences[worst]:.3g}"), "worst_step": worst,
            "first_step_rel_diff": float(f"{differences[steps[0]]:.3g}"), "tolerance": tolerance,
            "ok": differences[worst] <= tolerance}


def agree_part(bench, report):
    """The CPU's reference run, then (with a GPU) the GPU's runs against it and its checkpoint on the CPU."""
    steps = bench.args.agree_steps
    total = steps + RESUME_STEPS
    try:
        _, reference = train_run(bench, "cpu", "cpu", total)
        report.figure("train_losses", device="cpu", steps=total, first=reference[1], value=reference[total])
    except (*FAILURES, KeyError) as error:
        report.error("train_losses", error, device="cpu", steps=total)
        reference = None
    checks = [("loss_agreement", {"against": "cpu", "tf32": False}),
              ("loss_agreement", {"against": "cpu", "tf32": True}),
              ("mirrored_agreement", {"against": "gpu, one device"}),
              ("checkpoint_resumes_on_cpu", {"against": "cpu"}), ("checkpoint_samples_on_cpu", {})]
    if bench.no_gpu or reference is None:
        for name, fields in checks:
            if bench.no_gpu:
                bench.skipped(report, name, **fields)
            else:
                report.figure(name, device="gpu", **fields, error="the CPU's reference run failed")
        return
    gpu_checks(bench, report, reference, steps)


def gpu_checks(bench, report, reference, steps):
    """The GPU's runs against the CPU's `reference` losses, mirrored against one device, and the checkpoint moved."""
    compared = range(1, steps + 1)
    try:
        save_dir, strict = train_run(bench, "gpu", "gpu", steps, tf32=False)
        report.figure("loss_agreement", device="gpu", against="cpu", tf32=False,
                      **agreement(strict, reference, compared, REL_TOLERANCE))
    except FAILURES as error:
        report.error("loss_agreement", error, device="gpu", against="cpu", tf32=False)
        save_dir = strict = None
    try:
        _, tf32 = train_run(bench, "gpu", "gpu-tf32", steps)
        report.figure("loss_agreement", device="gpu", against="cpu", tf32=True,
                      **agreement(tf32, reference, compared, TF32_REL_TOLERANCE))
    except FAILURES as error:
        report.error("loss_agreement", error, device="gpu", against="cpu", tf32=True)
    try:
        if strict is None:
            raise ValueError("the GPU's one-device run failed")
        _, mirrored = train_run(bench, "gpu", "gpu-mirrored", steps, "--strategy", "mirrored", tf32=False)
        report.figure("mirrored_agreement", device="gpu", against="gpu, one device",
                      **agreement(mirrored, strict, compared, REL_TOLERANCE))
    except FAILURES as error:
        report.error("mirrored_agreement", error, device="gpu", against="gpu, one device")
    checkpoint_moves(bench, report, save_dir, reference, steps)


def checkpoint_moves(bench, report, save_dir, reference, steps):
    """The checkpoint in `save_dir` (of step `steps`, written on the GPU) resumed on the CPU for RESUME_STEPS steps,
    its losses against `reference` (an uninterrupted CPU run), and sample.py on the CPU sampling from it."""
    resumed = range(steps + 1, steps + RESUME_STEPS + 1)
    try:
        if save_dir is None:
            raise ValueError("the GPU's run failed: no checkpoint to move")
        _, losses = train_run(bench, "cpu", "resumed-on-cpu", resumed[-1], "--init_from", save_dir)
        report.figure("checkpoint_resumes_on_cpu", device="gpu", against="cpu",
                      **agreement(losses, reference, resumed, REL_TOLERANCE))
    except FAILURES as error:
        report.error("checkpoint_resumes_on_cpu", error, device="gpu", against="cpu")
    try:
        if save_dir is None:
            raise ValueError("the GPU's run failed: no checkpoint to sample from")
        text = run_child([sys.executable, os.path.join(REPO, "sample.py"), "--save_dir", save_dir, "-n", "200",
                          "--seed", str(SEED)], device_env("cpu"))
        report.figure("checkpoint_samples_on_cpu", device="gpu", chars=len(text), ok=len(text) >= 200)
    except FAILURES as error:
        report.error("checkpoint_samples_on_cpu", error, device="gpu")


# ----------------------------------------------------------------------------------------------------------
# sample and server: on a save dir of the first --sizes


def sample_save_dir(bench):
    """A save dir of an untrained LSTM of the first --sizes over the text's characters (as fast as a trained one),
    written on first use by bench/long_samples.py."""
    if bench.save_dir is None:
        import utils
        with open(os.path.join(bench.data_dir, "input.txt"), encoding="utf-8") as f:
            vocab = sorted(set(utils.normalize_newlines(f.read(), False)))
        bench.save_dir = os.path.join(bench.work, "model")
        long_samples.write_save_dir(bench.save_dir, vocab, *bench.args.sizes[0])
    return bench.save_dir


def device_runs(bench, device):
    """bench/long_samples.py's timed sample.py runs on `device`, with a compilation cache of the device's own."""
    long_n = bench.args.sample_n + long_samples.SHORT_N
    runs = long_samples.Runs(os.path.join(bench.work, device), {"new": REPO}, long_n)
    runs.env = {**device_env(device), "CHAR_RNN_XLA_CACHE": runs.cache}
    return runs


def sampling(bench, device):
    """(chars/s at n = --sample_n, the median wall time of a one-off `sample.py -n 500`, that of the first one,
    which compiles into an empty cache what the others then read: -n 500 uses every block size a long sample
    does)."""
    runs, save_dir = device_runs(bench, device), sample_save_dir(bench)
    first = runs.wall(runs.sample("new", save_dir, long_samples.ONE_OFF_N))
    short = runs.wall(runs.sample("new", save_dir, long_samples.SHORT_N))
    long = runs.wall(runs.sample("new", save_dir, runs.long_n))
    if long <= short:
        raise ValueError(f"sample.py -n {runs.long_n} took no longer than -n {long_samples.SHORT_N}: give a larger "
                         f"--sample_n")
    one_off = statistics.median(runs.wall(runs.sample("new", save_dir, long_samples.ONE_OFF_N))
                                for _ in range(bench.args.one_off_runs))
    return bench.args.sample_n / (long - short), one_off, first


def sample_part(bench, report):
    """Sampling chars/s and a one-off sample.py's wall time on each device, and the GPU's rate over the CPU's."""
    n, rates = bench.args.sample_n, {}
    figures = (("sample_chars_per_s", {"n": n}), ("sample_py_n500_s", {"runs": bench.args.one_off_runs}),
               ("sample_py_n500_first_s", {}))
    for device in DEVICES:
        if device == "gpu" and bench.no_gpu:
            for name, fields in figures:
                bench.skipped(report, name, **fields)
            continue
        try:
            values = sampling(bench, device)
        except FAILURES as error:
            for name, fields in figures:
                report.error(name, error, device=device, **fields)
            continue
        rates[(device,)] = values[0]
        for (name, fields), value in zip(figures, values):
            report.figure(name, device=device, **fields, value=round(value, 1 if name == "sample_chars_per_s" else 2))
    ratio(bench, report, "sample_gpu_over_cpu", rates, (), n=n)


def server_part(bench, report):
    """bench/server.py on each device: each setup's requests/s and latency at each client count, and the ratio."""
    args = bench.args
    for device in DEVICES:
        if device == "gpu" and bench.no_gpu:
            for clients in args.clients:
                for setup in ("batched", "batching_off"):
                    bench.skipped(report, "server_requests_per_s", clients=clients, setup=setup)
                bench.skipped(report, "server_batching_ratio", clients=clients)
            continue
        try:
            summary = serve(bench, device)
        except FAILURES as error:
            for clients in args.clients:
                report.error("server_batching_ratio", error, device=device, clients=clients)
            continue
        for clients in args.clients:
            for setup in ("batched", "batching_off"):
                key = f"{setup}_{clients}"
                report.figure("server_requests_per_s", device=device, clients=clients, setup=setup, n=args.request_n,
                              value=summary[f"{key}_requests_per_s"], p50_ms=summary[f"{key}_p50_ms"],
                              p99_ms=summary[f"{key}_p99_ms"], not_200=summary[f"{key}_not_200"],
                              ok=summary[f"{key}_not_200"] == 0)
            report.figure("server_batching_ratio", device=device, clients=clients,
                          value=summary[f"ratio_{clients}_clients"])


def serve(bench, device):
    """bench/server.py's summary line (its two servers on `device`, listening on 127.0.0.1)."""
    args = bench.args
    runs = device_runs(bench, device)  # its compilation cache, filled by the sample part when that ran
    out = run_child([sys.executable, os.path.join(BENCH, "server.py"), "--save_dir", sample_save_dir(bench),
                     "--clients", ",".join(map(str, args.clients)), "--seconds", str(args.server_seconds),
                     "--rounds", str(args.server_rounds), "-n", str(args.request_n), "--ceiling", "0"], runs.env)
    summary = [line for line in json_lines(out) if line.get("mode") == "server_summary"]
    if not summary:
        raise ValueError("bench/server.py printed no summary line")
    return summary[0]


PART_RUNS = {"train": train_part, "agree": agree_part, "sample": sample_part, "server": server_part}


def main(argv=None):
    args = parse_args(argv)
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    if len(text) < MIN_CHARS:
        raise ValueError(f"--data {args.data} holds {len(text):,} characters: the training timer needs "
                         f"{MIN_CHARS:,} (six batches of 50 x 50)")
    missing = sorted(set(PRIME) - set(text))
    if missing and {"sample", "server"} & set(args.parts):
        raise ValueError(f"--data {args.data} has no {missing[0]!r}: sample.py and bench/server.py prime the model "
                         f"(of the text's characters) with {PRIME!r}")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # this process writes the sample part's model
    cli.quiet_tensorflow()
    import tensorflow as tf

    report, work = Report(), tempfile.mkdtemp(prefix="char-rnn-gpu-")
    try:
        fields, no_gpu = devices(tf)
        report.figure("devices", **fields)
        data_dir = os.path.join(work, "data")
        os.makedirs(data_dir)
        shutil.copyfile(args.data, os.path.join(data_dir, "input.txt"))
        bench = Bench(args, work, data_dir, no_gpu)
        for part in args.parts:
            PART_RUNS[part](bench, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if report.failed:
        return cli.fail(f"{len(report.failed)} figures failed: {', '.join(sorted(set(report.failed)))}",
                        cli.EXIT_FAILURE)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
