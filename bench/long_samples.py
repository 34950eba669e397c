"""Long-sample yardstick: the generation rate of a one-off `sample.py` for this checkout beside an older one, and
its start beside a bare `import tensorflow`, in one run.

usage: git worktree add --detach ../b88a92b b88a92b
       python bench/long_samples.py --data ../shared/data/tinyshakespeare/input.txt --old ../b88a92b
       python bench/long_samples.py --data ... --old ../b88a92b --old ../d49d766 --long_n 1000010

For each model size (--models, default the original's 3 x 128 LSTM and a small 2 x 32 one) the bench writes a save
dir with untrained weights (as fast as trained ones) over the text's vocabulary, which every checkout's sample.py
must load (each --old, repeatable, is a checkout of an older revision: [NAME=]PATH, named by its folder unless
NAME is given). Then, for --rounds
rounds, each checkout's `sample.py -n 10` and `sample.py -n 200010` (--long_n; both `--seed 1`) are timed from
start to exit, in turns (the checkouts' order reversed each round), so that all see the same state of the machine.
The generation rate of a checkout is 200,000 tokens (the difference of the two n) over the difference of the two
wall times: start-up, loading and compiling cancel out. Before the clock starts, each checkout's `-n 10` runs once
untimed, so that XLA's compilation cache on disk (a folder of this run's) holds what it compiles: the figures are
warm ones, and the bench checks that the timed runs, long ones included, added nothing to the cache (no block size
of a long sample is compiled anew in each run).

Then `python sample.py -n 500` of each checkout (the first model) and `python -c "import tensorflow"` are timed in
turns, --one_off_runs times each (0: skip).

In process (--in_process_rounds, 0: skip): a child process imports every checkout's sampler side by side (each
checkout's modules apart) and times `Sampler.sample("", long_n, seed=1)` of each in turns, after a warm-up sample
whose text must be the same for all: the generation alone, without the start-up of two processes whose difference
the rates above divide by, which on a busy machine varies by seconds.

Prints one JSON line per timed run, then a summary line: each checkout's median rate per model, this checkout's
over each older one's (the ratio of the medians, and each round's), and the one-off medians.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402

SHORT_N = 10
LONG_N = 200_010
ONE_OFF_N = 500
SEED = 1


def model_size(text):
    """'3x128' -> (3 layers, 128 units), for --models."""
    try:
        layers, units = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYERSxUNITS, e.g. 3x128") from None
    if layers < 1 or units < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: layers and units must be positive")
    return layers, units


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a UTF-8 text whose characters are the vocabulary")
    parser.add_argument("--old", action="append", required=True,
                        help="[NAME=]PATH: a checkout of an older revision (git worktree add ...); repeatable")
    parser.add_argument("--long_n", type=cli.positive_int, default=LONG_N, help="n of the long sample")
    parser.add_argument("--models", type=lambda text: [model_size(part) for part in text.split(",")],
                        default=[(3, 128), (2, 32)], help="comma-separated LSTM sizes, LAYERSxUNITS")
    parser.add_argument("--rounds", type=cli.positive_int, default=2, help="rounds of every timed run")
    parser.add_argument("--in_process_rounds", type=cli.non_negative_int, default=5,
                        help="rounds of the in-process timing of every checkout's Sampler (0: skip)")
    parser.add_argument("--one_off_runs", type=cli.non_negative_int, default=5,
                        help="runs of `sample.py -n 500` and of `python -c 'import tensorflow'`, in turns (0: skip)")
    return parser


def write_save_dir(save_dir, vocab, layers, units):
    """A save dir of an untrained LSTM of `layers` x `units` over `vocab`, as train.py writes one."""
    import tensorflow as tf

    import checkpoints
    import savedir
    from model import CharRNN
    from settings import ModelConfig

    model = CharRNN(ModelConfig(len(vocab), "lstm", rnn_size=units, num_layers=layers))
    model.build_weights()
    os.makedirs(save_dir)
    savedir.write_config(save_dir, {**model.model_config.to_dict(), "word_level": False})
    savedir.write_vocab(save_dir, vocab)
    checkpoints.checkpoint_manager(tf.train.Checkpoint(model=model), save_dir).save(0)


class Runs:
    """The commands timed, with one environment: XLA's compilation cache in a folder of this run's."""

    def __init__(self, work, checkouts, long_n):
        self.cache = os.path.join(work, "xla-cache")
        self.env = dict(os.environ, CHAR_RNN_XLA_CACHE=self.cache)
        self.checkouts, self.long_n = checkouts, long_n

    def sample(self, name, save_dir, n):
        return [sys.executable, os.path.join(self.checkouts[name], "sample.py"), "--save_dir", save_dir,
                "-n", str(n), "--seed", str(SEED)]

    def wall(self, command):
        """Seconds from start to exit; a failure is a ValueError with the command's last line."""
        start = time.perf_counter()
        done = subprocess.run(command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ValueError(f"{' '.join(command)} failed: {last}")
        return seconds

    def cached(self):
        """The files in the compilation cache."""
        return sum(len(files) for _, _, files in os.walk(self.cache))


def rates(runs, save_dirs, rounds):
    """The timed rounds: {model: {checkout: [rates]}}, each checkout's -n 10 and -n long_n in turns."""
    found = {model: {name: [] for name in runs.checkouts} for model in save_dirs}
    for round_ in range(rounds):
        order = list(runs.checkouts) if round_ % 2 == 0 else list(reversed(runs.checkouts))
        for model, save_dir in save_dirs.items():
            for name in order:
                short = runs.wall(runs.sample(name, save_dir, SHORT_N))
                long = runs.wall(runs.sample(name, save_dir, runs.long_n))
                rate = (runs.long_n - SHORT_N) / (long - short)
                found[model][name].append(rate)
                print(json.dumps({"round": round_ + 1, "model": model, "checkout": name, "short_n_s": round(short, 2),
                                  "long_n_s": round(long, 2), "chars_per_s": round(rate)}), flush=True)
    return found


def one_off(runs, save_dir, count):
    """Medians of each checkout's `sample.py -n 500` and of a bare `import tensorflow`, timed in turns, and this
    checkout's time less the import's in each turn."""
    commands = {name: runs.sample(name, save_dir, ONE_OFF_N) for name in runs.checkouts}
    commands["import"] = [sys.executable, "-c", "import tensorflow"]
    times = {name: [] for name in commands}
    for _ in range(count):
        for name, command in commands.items():
            times[name].append(runs.wall(command))
    return {"one_off_n500_s": {name: round(statistics.median(values), 2) for name, values in times.items()},
            "one_off_new_over_import_per_run_s": [round(a - b, 2) for a, b in zip(times["new"], times["import"])]}


IN_PROCESS_CHILD = """
import json, os, sys, time
checkouts, save_dir, n, rounds = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
samplers = {}
for name, root in checkouts.items():  # each checkout's modules imported apart, each keeping its own
    sys.path.insert(0, root)
    import sampler
    samplers[name] = sampler.Sampler.load(save_dir)
    sys.path.remove(root)
    for module_name, module in list(sys.modules.items()):  # the project's own modules (not a venv's inside root)
        if os.path.dirname(getattr(module, "__file__", None) or "") == root:
            del sys.modules[module_name]
texts = {name: each.sample("", 3000, seed=1) for name, each in samplers.items()}  # and the warm-up
rates = {name: [] for name in samplers}
for round_ in range(rounds):
    for name in (list(samplers) if round_ % 2 == 0 else list(reversed(samplers))):
        start = time.perf_counter()
        samplers[name].sample("", n, seed=1)
        rates[name].append(n / (time.perf_counter() - start))
print(json.dumps({"rates": rates, "same_text": len(set(texts.values())) == 1}))
"""


def in_process(runs, save_dirs, rounds):
    """{model: {checkout: [rates]}} of every checkout's Sampler in one child process, in turns; and whether
    their texts for one seed were the same."""
    found, same = {}, True
    for model, save_dir in save_dirs.items():
        done = subprocess.run([sys.executable, "-c", IN_PROCESS_CHILD, json.dumps(runs.checkouts), save_dir,
                               str(runs.long_n), str(rounds)], env=dict(runs.env, TF_CPP_MIN_LOG_LEVEL="3"),
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise ValueError(f"the in-process timing failed: {last}")
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        found[model], same = answer["rates"], same and answer["same_text"]
        print(json.dumps({"in_process": model, "chars_per_s": {name: [round(rate) for rate in rates]
                                                               for name, rates in found[model].items()}}), flush=True)
    return found, same


def summarize(found):
    """Each checkout's median rate per model, and this checkout's over each older one's."""
    summary = {}
    for model, by_checkout in found.items():
        summary[model] = {f"{name}_chars_per_s": round(statistics.median(values))
                          for name, values in by_checkout.items()}
        new = by_checkout["new"]
        for name, values in by_checkout.items():
            if name != "new":
                summary[model][f"new_over_{name}"] = round(statistics.median(new) / statistics.median(values), 2)
                summary[model][f"new_over_{name}_per_round"] = [round(a / b, 2) for a, b in zip(new, values)]
    return summary


def main(argv=None):
    args = build_parser().parse_args(argv)
    checkouts = {"new": REPO}
    for old in args.old:
        name, _, path = old.rpartition("=")
        if not os.path.isfile(os.path.join(path, "sample.py")):
            raise FileNotFoundError(f"{path}/sample.py not found: --old must be a checkout of the project")
        checkouts[name or os.path.basename(os.path.normpath(path))] = os.path.abspath(path)
    cli.quiet_tensorflow()
    import utils
    with open(args.data, encoding="utf-8") as f:
        vocab = sorted(set(utils.normalize_newlines(f.read(), False)))
    work = tempfile.mkdtemp(prefix="char-rnn-long-")
    try:
        runs = Runs(work, checkouts, args.long_n)
        save_dirs = {}
        for layers, units in args.models:
            save_dirs[f"{layers}x{units}"] = os.path.join(work, f"lstm-{layers}x{units}")
            write_save_dir(save_dirs[f"{layers}x{units}"], vocab, layers, units)
        for save_dir in save_dirs.values():  # loads in every checkout, and fills the cache
            for name in runs.checkouts:
                runs.wall(runs.sample(name, save_dir, SHORT_N))
        cached = runs.cached()
        found = rates(runs, save_dirs, args.rounds)
        result = {"rates": summarize(found), "rounds": args.rounds, "long_n": args.long_n, "cache_files_warm": cached,
                  "cache_files_added_while_timed": runs.cached() - cached}
        if args.in_process_rounds:
            found, same = in_process(runs, save_dirs, args.in_process_rounds)
            result.update({"in_process": summarize(found), "in_process_same_text": same})
        if args.one_off_runs:
            result.update(one_off(runs, next(iter(save_dirs.values())), args.one_off_runs))
        print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
