"""Distributed training's overhead: training tokens/s on one device, on 2 mirrored replicas (the CPU split in two)
and on 2 worker processes on 127.0.0.1 (multi_worker), side by side, as one JSON line; then an estimate of how
training would scale over N machines on a network of --gbit_per_s.

usage: python bench/distributed.py --data ../shared/data/tinyshakespeare/input.txt [--steps 50] [--rounds 1]

Each run is train.py itself at the original's default sizes (3 x 128 LSTM, batch 50, seq 50): 2 x --steps steps,
printing every --steps steps; the second interval (compiled, warm) is the one timed. Rounds alternate the three
setups, so that they see the same machine state. On a 2-core machine no speed-up is expected: the two replicas
or workers share the cores that one device uses, and what the figures show is the cost of splitting the batch,
summing the gradients and gathering the state.

The estimate: a step on N machines, each with the batch one device has here, takes the measured one-device step
time plus a ring all-reduce of the gradients (2 (N - 1) / N of their bytes through each machine's link) and the
all-gather of the carried state ((N - 1) / N of its bytes), at the given bandwidth; latency is left out.
"""
import argparse
import csv
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402
from settings import TRAIN_DEFAULTS  # noqa: E402

SIZES = {name: getattr(TRAIN_DEFAULTS, name) for name in ("rnn_size", "num_layers", "batch_size", "seq_length")}
SETUPS = ("one", "mirrored", "multi_worker")
FLOAT_BYTES = 4


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="path to a UTF-8 text (tinyshakespeare's input.txt)")
    parser.add_argument("--steps", type=cli.positive_int, default=50, help="timed training steps per run")
    parser.add_argument("--rounds", type=cli.positive_int, default=1, help="rounds of the three setups")
    parser.add_argument("--gbit_per_s", type=cli.positive_float, default=10.0, help="network of the estimate")
    parser.add_argument("--machines", default="2,4,8,16", help="machine counts of the estimate")
    return parser


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_run(setup, data_dir, save_dir, steps):
    """Run train.py in `setup`; returns the warm interval's tokens/s (from the chief's metrics.csv)."""
    flags = [f"--{name}={value}" for name, value in SIZES.items()] + [
        "--data_dir", data_dir, "--save_dir", save_dir, "--val_frac", "0", "--seed", "1",
        "--max_steps", str(2 * steps), "--print_every", str(steps), "--save_every", str(10 * steps)]
    command = [sys.executable, os.path.join(REPO, "train.py"), *flags]
    if setup == "one":
        processes = [subprocess.Popen([*command, "--strategy", "one"], stdout=subprocess.DEVNULL)]
    elif setup == "mirrored":
        processes = [subprocess.Popen([*command, "--strategy", "mirrored", "--replicas", "2"],
                                      stdout=subprocess.DEVNULL)]
    else:
        cluster = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        processes = []
        for index in range(2):
            env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": cluster},
                                                         "task": {"type": "worker", "index": index}}))
            processes.append(subprocess.Popen([*command, "--strategy", "multi_worker"], env=env,
                                              stdout=subprocess.DEVNULL))
    codes = [process.wait() for process in processes]
    if any(codes):
        raise ValueError(f"train.py failed in setup {setup} (exit codes {codes})")
    with open(os.path.join(save_dir, "metrics.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row["tokens_per_s"]]
    shutil.rmtree(save_dir)
    return float(rows[-1]["tokens_per_s"])


def model_bytes(vocab_size):
    """(gradient bytes, carried-state bytes) of the benchmarked LSTM."""
    units, layers = SIZES["rnn_size"], SIZES["num_layers"]
    per_layer = 2 * units * 4 * units + 4 * units  # kernel, recurrent kernel, bias (embedding as wide as units)
    parameters = vocab_size * units + layers * per_layer + units * vocab_size + vocab_size
    state = 2 * layers * SIZES["batch_size"] * units
    return parameters * FLOAT_BYTES, state * FLOAT_BYTES


def scaling_estimate(step_s, gradient_bytes, state_bytes, gbit_per_s, machines):
    """{N: (step seconds, tokens/s, efficiency)} for N machines, each with one device's batch."""
    link = gbit_per_s * 1e9 / 8
    tokens = SIZES["batch_size"] * SIZES["seq_length"]
    estimate = {}
    for n in machines:
        communication = (2 * (n - 1) / n * gradient_bytes + (n - 1) / n * state_bytes) / link
        step = step_s + communication
        estimate[n] = {"step_ms": round(step * 1000, 2), "communication_ms": round(communication * 1000, 2),
                       "tokens_per_s": round(n * tokens / step, 1), "efficiency": round(step_s / step, 3)}
    return estimate


def main(argv=None):
    args = build_parser().parse_args(argv)
    work = tempfile.mkdtemp(prefix="char-rnn-distributed-")
    try:
        data_dir = os.path.join(work, "data")
        os.makedirs(data_dir)
        shutil.copyfile(args.data, os.path.join(data_dir, "input.txt"))
        runs = {setup: [] for setup in SETUPS}
        for _ in range(args.rounds):
            for setup in SETUPS:
                runs[setup].append(train_run(setup, data_dir, os.path.join(work, "save"), args.steps))
        with open(os.path.join(data_dir, "input.txt"), encoding="utf-8") as f:
            vocab_size = len(set(f.read().replace("\r\n", "\n")))
        medians = {setup: round(statistics.median(values), 1) for setup, values in runs.items()}
        gradient_bytes, state_bytes = model_bytes(vocab_size)
        step_s = SIZES["batch_size"] * SIZES["seq_length"] / medians["one"]
        machines = [int(n) for n in args.machines.split(",")]
        result = {"train_tokens_per_s": medians, "runs": runs,
                  "ratio_to_one": {setup: round(medians[setup] / medians["one"], 2) for setup in SETUPS},
                  "one_device_step_ms": round(step_s * 1000, 2), "gradient_mb": round(gradient_bytes / 1e6, 3),
                  "state_mb": round(state_bytes / 1e6, 3), "gbit_per_s": args.gbit_per_s,
                  "estimate": scaling_estimate(step_s, gradient_bytes, state_bytes, args.gbit_per_s, machines)}
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
