"""Sampling speed of checkouts side by side, in turns: chars/s of the compiled generator (bench/speed.py's figure),
of the block loop that sample.py and the server run, and of the text (or logprobs) of Sampler around it, with a
setting given or not, each checkout in a process
of its own, kept warm, timed one after the other round after round, so that all see the same state of a shared
machine. Prints one JSON line: each checkout's medians and each other's ratio to the first, per round and median.

usage: python bench/sampling_turns.py --checkouts /path/to/before,. --rounds 15
       python bench/sampling_turns.py --checkouts . --settings logprobs=0,logprobs=5   # one checkout, two settings
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402

VOCAB = 65  # tinyshakespeare's characters; untrained weights sample as fast as trained ones

# The child: a 3 x 128 LSTM (train.py's defaults) in one checkout; each line it reads names a run to time.
CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
import cli
cli.quiet_tensorflow(one_thread_per_op=True)
import tensorflow as tf
import savedir
from model import CharRNN
from sampler import Sampler
from settings import ModelConfig, SampleSettings, TrainConfig
model = CharRNN(ModelConfig(int(sys.argv[2])))
model.build_weights()
vocab = [chr(32 + i) for i in range(int(sys.argv[2]))]
sampler = Sampler(savedir.Loaded(TrainConfig(), model.model_config, vocab, None, model, "bench"))
generator = sampler.generator
n = int(sys.argv[3])

def generate():
    count = tf.constant(n)
    args = [tf.constant([1], tf.int32), count, tf.constant(1.0), tf.constant(1), tf.constant(7, tf.int64),
            tf.constant(0), tf.constant(1.0)]
    arity = len(generator.generate.input_signature)
    generator.generate(*args, *[tf.constant(0.0)] * (arity - len(args))).numpy()

def read(setting):
    values = dict(item.split("=") for item in setting.split(",") if item)
    return SampleSettings(prime=vocab[1], n=n, seed=7, **{name: type(getattr(SampleSettings, name))(value)
                                                          for name, value in values.items()})

def blocks(setting):
    for _ in generator.blocks([1], n, read(setting)):
        pass

def text(setting):
    settings = read(setting)
    sampler.samples(settings, 1) if getattr(settings, "logprobs", 0) else sampler.run(settings)  # older: none

for line in sys.stdin:
    kind, _, setting = line.strip().partition(" ")
    run = generate if kind == "generate" else (lambda: (blocks if kind == "blocks" else text)(setting))
    start = time.perf_counter()
    run()
    print(time.perf_counter() - start, flush=True)
"""


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkouts", default=".", help="comma-separated checkouts to compare (the first is the base)")
    parser.add_argument("--settings", default="",
                        help="comma-separated block-loop settings to time beside the plain one, as name=value "
                             "(e.g. logprobs=5), with one checkout (an older one may not have the setting)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds; each times every run once, in turns")
    parser.add_argument("-n", type=int, default=4000, help="tokens per timed sample")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    checkouts = [os.path.abspath(path) for path in args.checkouts.split(",")]
    if args.settings and len(checkouts) > 1:
        raise ValueError("--settings compares settings within one checkout: give one --checkouts")
    runs = [(checkout, "generate", "") for checkout in checkouts]
    runs += [(checkout, loop, setting) for loop in ("blocks", "text")
             for setting in [""] + [s for s in args.settings.split(",") if s] for checkout in checkouts]
    children = {checkout: subprocess.Popen([sys.executable, "-c", CHILD, checkout, str(VOCAB), str(args.n)],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for checkout in checkouts}

    def timed(checkout, kind, setting):
        child = children[checkout]
        child.stdin.write(f"{kind} {setting}\n")
        child.stdin.flush()
        return float(child.stdout.readline())

    try:
        for run in runs:  # warm-up: each variant compiles
            timed(*run)
        times = {run: [] for run in runs}
        for round_ in range(args.rounds):
            # Every other round in reverse order, so that no run always follows the same one.
            for run in runs if round_ % 2 == 0 else runs[::-1]:
                times[run].append(timed(*run))
    finally:
        for child in children.values():
            child.stdin.close()
            child.wait()
    rates = {run: [args.n / seconds for seconds in values] for run, values in times.items()}
    base = {(kind, setting): rates[(checkouts[0], kind, setting)] for _, kind, setting in runs}
    result = {"n": args.n, "rounds": args.rounds, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "runs": []}
    for (checkout, kind, setting), values in rates.items():
        against = base[(kind, "")] if len(checkouts) == 1 else base[(kind, setting)]
        ratios = [value / other for value, other in zip(values, against)]
        result["runs"].append({"checkout": checkout, "loop": kind, "setting": setting or "none",
                               "chars_per_s": round(statistics.median(values), 1),
                               "ratio_to_base": round(statistics.median(ratios), 3),
                               "ratio_per_round": [round(ratio, 2) for ratio in ratios]})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
