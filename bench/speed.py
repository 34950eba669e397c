"""Speed yardstick: training tokens/s, sampling chars/s and preprocessing throughput, as one JSON line.

usage: python bench/speed.py --data ../shared/data/tinyshakespeare/input.txt
       python bench/speed.py --data ... --peer_python /tmp/peer/bin/python --peer_script ../shared/bench/peer_torch.py

Training: the original's default sizes (3 x 128, batch 50, seq 50) on the given text, `--steps` compiled steps
timed after a warm-up, for each of --models. Server: requests/s and latency at n = 200 (bench/server.py).
Sampling: chars/s of the compiled generator at n = --sample_n (and, beside it in turns, of the SavedModel that
export.py writes, which runs without XLA), and
seconds per token at n = 1,000 and n = 100,000 (flat means no slow-down as the text grows); with --logprobs_cost,
chars/s of the block loop that sample.py and the server run, without logprobs and with logprobs = 5, in turns. Preprocessing: a
synthetic corpus of --preprocess_mb MB (the text repeated) tokenized in a child process, with its MB/s and peak
resident memory per input byte. With --peer_*, the PyTorch peer's speed mode runs in the same invocation: for
each of --rounds rounds and each cell type, ours is timed, then the peer; the medians, their ratios and each
round's ratio are printed (a shared machine's speed drifts, and this compares like with like).
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

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="path to a UTF-8 text (tinyshakespeare's input.txt)")
    parser.add_argument("--models", default="lstm,gru,rnn", help="comma-separated cell types to time")
    parser.add_argument("--steps", type=cli.positive_int, default=100, help="timed training steps per model")
    parser.add_argument("--rounds", type=cli.positive_int, default=3,
                        help="rounds of (ours, then the peer) per cell type; medians and per-round ratios reported")
    parser.add_argument("--sample_n", type=cli.positive_int, default=2000, help="tokens per timed sample")
    parser.add_argument("--one_off_runs", type=cli.non_negative_int, default=5,
                        help="runs of `python sample.py -n 500` and of `python -c 'import tensorflow'`, in turns, for "
                             "the one-off latency (0: skip it)")
    parser.add_argument("--export", type=int, default=1, choices=[0, 1],
                        help="1: also time the exported SavedModel (export.py) beside the Generator at --sample_n")
    parser.add_argument("--logprobs_cost", type=int, default=1, choices=[0, 1],
                        help="1: also time sample.py's block loop at --sample_n without logprobs and with 5, in turns")
    parser.add_argument("--flat_n", default="1000,100000", help="n values for the time-per-token check")
    parser.add_argument("--preprocess_mb", type=cli.non_negative_int, default=100,
                        help="size of the synthetic preprocessing corpus in MB (0: skip)")
    parser.add_argument("--server_clients", type=cli.non_negative_int, default=8,
                        help="concurrent clients of the server measurement (0: skip it)")
    parser.add_argument("--server_seconds", type=cli.positive_float, default=10.0, help="length of that run")
    parser.add_argument("--peer_python", default=None, help="python of the PyTorch peer's environment")
    parser.add_argument("--peer_script", default=None, help="path of the peer's peer_torch.py")
    return parser


def default_loader(data_dir):
    """The TextLoader of train.py's default settings over data_dir's text, without a validation split."""
    import dataclasses

    from settings import TRAIN_DEFAULTS
    from utils import TextLoader
    return TextLoader.from_config(dataclasses.replace(TRAIN_DEFAULTS, data_dir=data_dir, val_frac=0.0))


def train_speed(data_dir, cell):
    """A timer of training tokens/s at the default sizes for one cell type: (timer(steps), model)."""
    from tensorflow import keras

    from model import CharRNN
    from settings import TRAIN_DEFAULTS as DEFAULTS, ModelConfig
    from trainer import Progress, make_train_step

    loader = default_loader(data_dir)
    model = CharRNN(ModelConfig(loader.vocab_size, cell))  # the default rnn_size and num_layers
    model.build_weights()
    optimizer = keras.optimizers.Adam(DEFAULTS.learning_rate)
    optimizer.build(model.trainable_variables)
    progress = Progress(model.num_states, DEFAULTS.batch_size, DEFAULTS.rnn_size, DEFAULTS.seq_length)
    step = make_train_step(model, optimizer, progress, DEFAULTS.grad_clip)
    for i in range(5):  # warm-up: tracing and the first allocations
        step(*loader.batch(i))

    def timer(steps):
        start = time.perf_counter()
        for i in range(steps):
            loss = step(*loader.batch((5 + i) % loader.num_batches))
        float(loss)
        return steps * DEFAULTS.batch_size * DEFAULTS.seq_length / (time.perf_counter() - start)
    return timer, model


def sample_speed(model, n, flat_ns):
    """Sampling chars/s at n (the median of three runs), and seconds per token for each of flat_ns."""
    import tensorflow as tf

    from sampler import Generator

    generator = Generator(model, space_id=0)

    def timed(count):
        start = time.perf_counter()
        generator.generate(tf.constant([1], tf.int32), tf.constant(count), tf.constant(1.0), tf.constant(1),
                           tf.constant(7, tf.int64), tf.constant(0), tf.constant(1.0), tf.constant(0.0),
                           tf.constant(0.0)).numpy()
        return time.perf_counter() - start

    timed(10)  # warm-up
    result = {"sample_chars_per_s": round(n / statistics.median(timed(n) for _ in range(3)), 1)}
    for count in flat_ns:
        result[f"sample_s_per_token_n{count}"] = timed(count) / count
    return result


def logprobs_speed(model, n, runs=5):
    """chars/s at n of Generator.blocks (the loop of sample.py and the server) without logprobs and with
    MAX_LOGPROBS (each token's log-probability and the likeliest alternatives), timed in turns; medians and their
    ratio."""
    from sampler import Generator
    from settings import MAX_LOGPROBS, SampleSettings

    generator = Generator(model, space_id=0)
    settings = {"plain": SampleSettings(n=n, seed=7), "logprobs": SampleSettings(n=n, seed=7, logprobs=MAX_LOGPROBS)}

    def timed(name):
        start = time.perf_counter()
        for _ in generator.blocks([1], n, settings[name]):
            pass
        return time.perf_counter() - start

    for name in settings:  # warm-up: each variant's block compiles
        timed(name)
    times = {name: [] for name in settings}
    for _ in range(runs):
        for name in settings:
            times[name].append(timed(name))
    rates = {name: n / statistics.median(values) for name, values in times.items()}
    return {"blocks_chars_per_s": round(rates["plain"], 1),
            f"blocks_logprobs{MAX_LOGPROBS}_chars_per_s": round(rates["logprobs"], 1),
            f"logprobs{MAX_LOGPROBS}_speed_ratio": round(rates["logprobs"] / rates["plain"], 3)}


def export_speed(model, data_dir, work, n, runs=3):
    """chars/s at n of the exported SavedModel (export.py: no XLA, prime text in, text out) beside the compiled
    Generator's (what sample.py runs), timed in turns so that both see the same machine state; and whether the
    two made the same ids for the same seed."""
    import tensorflow as tf

    import exporter
    import savedir
    from sampler import Generator
    from settings import TrainConfig

    vocab = default_loader(data_dir).vocab
    loaded = savedir.Loaded(TrainConfig(data_dir=data_dir), model.model_config, vocab, None, model, "bench")
    export_dir = os.path.join(work, "export", "1")
    exporter.write_export(loaded, export_dir)
    generate = tf.saved_model.load(export_dir).signatures["serving_default"]
    generator = Generator(model, space_id=vocab.index(" "))
    prime = "The"
    prime_ids = tf.constant([vocab.index(c) for c in prime], tf.int32)
    settings = dict(temperature=tf.constant(1.0), seed=tf.constant(7, tf.int64), top_k=tf.constant(0),
                    top_p=tf.constant(1.0), frequency_penalty=tf.constant(0.0), presence_penalty=tf.constant(0.0))

    def exported():
        return generate(prime=tf.constant(prime), n=tf.constant(n), sample_mode=tf.constant(1),
                        **settings)["token_ids"].numpy()

    def compiled():
        return generator.generate(prime_ids, tf.constant(n), settings["temperature"], tf.constant(1),
                                  settings["seed"], settings["top_k"], settings["top_p"],
                                  settings["frequency_penalty"], settings["presence_penalty"]).numpy()

    same = np.array_equal(exported(), compiled())  # also the warm-up of both
    times = {"exported": [], "compiled": []}
    for _ in range(runs):
        for name, run in (("compiled", compiled), ("exported", exported)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {"export_n": n, "export_sample_chars_per_s": round(n / statistics.median(times["exported"]), 1),
            "export_generator_chars_per_s": round(n / statistics.median(times["compiled"]), 1),
            "export_same_ids_as_generator": bool(same)}


# Peak resident memory of this process alone (VmHWM; getrusage's maxrss can carry the parent's peak).
PEAK_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
PREPROCESS_CHILD = f"""
import sys, time
sys.path.insert(0, sys.argv[1])
import utils
start = time.perf_counter()
ids, vocab, _ = utils.preprocess(sys.argv[2], sys.argv[3])
print(time.perf_counter() - start, {PEAK_RSS}, len(ids))
"""


def preprocess_speed(text_path, megabytes, work):
    """Tokenize a synthetic corpus of `megabytes` MB in a child process: MB/s and peak RSS per input byte."""
    corpus = os.path.join(work, "big.txt")
    with open(text_path, "rb") as f:
        text = f.read()
    with open(corpus, "wb") as f:
        for _ in range(megabytes * 1_000_000 // len(text) + 1):
            f.write(text)
        f.truncate(megabytes * 1_000_000)
    cache = os.path.join(work, "cache")
    os.makedirs(cache)
    baseline = subprocess.run([sys.executable, "-c", f"import numpy; print({PEAK_RSS})"], capture_output=True,
                              text=True, check=True)
    out = subprocess.run([sys.executable, "-c", PREPROCESS_CHILD, REPO, corpus, cache], capture_output=True,
                         text=True, check=True)
    seconds, peak, tokens = out.stdout.split()
    size = os.path.getsize(corpus)
    return {"preprocess_mb": megabytes, "preprocess_mb_per_s": round(size / 1e6 / float(seconds), 1),
            "preprocess_peak_rss_mb": round(int(peak) / 1e6, 1),
            "preprocess_peak_bytes_per_input_byte": round(int(peak) / size, 3),
            "preprocess_python_numpy_baseline_mb": round(int(baseline.stdout) / 1e6, 1)}


def write_save_dir(model, data_dir, save_dir):
    """A save dir holding `model` (untrained weights are as fast as trained ones), as sample.py and the server
    read it."""
    import tensorflow as tf

    import checkpoints
    import savedir

    if os.path.isdir(save_dir):
        return save_dir
    loader = default_loader(data_dir)
    os.makedirs(save_dir)
    savedir.write_config(save_dir, {**model.model_config.to_dict(), "word_level": False})
    savedir.write_vocab(save_dir, loader.vocab)
    checkpoints.checkpoint_manager(tf.train.Checkpoint(model=model), save_dir).save(0)
    return save_dir


def one_off_latency(model, data_dir, work, runs, n=500):
    """Wall time of a one-off `python sample.py -n 500` beside `python -c "import tensorflow"`, run in turns so
    that both see the same machine state: the first sample.py with an empty compilation cache, then the medians
    of `runs` runs of each with it filled."""
    save_dir = write_save_dir(model, data_dir, os.path.join(work, "serve"))
    env = dict(os.environ, CHAR_RNN_XLA_CACHE=os.path.join(work, "xla-cache"))
    sample = [sys.executable, os.path.join(REPO, "sample.py"), "--save_dir", save_dir, "-n", str(n), "--seed", "1"]
    just_import = [sys.executable, "-c", "import tensorflow"]

    def wall(command):
        start = time.perf_counter()
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    first = wall(sample)
    times = {"sample": [], "import": []}
    for _ in range(runs):
        times["sample"].append(wall(sample))
        times["import"].append(wall(just_import))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"one_off_sample_py_n500_s": round(medians["sample"], 2),
            "one_off_import_tensorflow_s": round(medians["import"], 2),
            "one_off_over_import_s": round(medians["sample"] - medians["import"], 2),
            "one_off_over_import_per_run_s": [round(a - b, 2) for a, b in zip(times["sample"], times["import"])],
            "one_off_first_run_empty_cache_s": round(first, 2)}


def server_speed(model, data_dir, work, clients, seconds):
    """Requests/s and latency of sample_server.py at n = 200, serving `model` (see bench/server.py)."""
    save_dir = write_save_dir(model, data_dir, os.path.join(work, "serve"))
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "server.py"), "--save_dir", save_dir,
                          "--clients", str(clients), "--seconds", str(seconds), "-n", "200"],
                         capture_output=True, text=True, check=True)
    # bench/server.py prints a line per server and client count, then a summary: take the batched server's line.
    lines = [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
    served = next(line for line in lines if line.get("mode") == "server" and line.get("setup") == "batched")
    return {f"server_{key}": served[key] for key in ("requests_per_s", "p50_ms", "p99_ms")} | {
        "server_clients": clients}


def peer_speed(args, cell):
    """The PyTorch peer's speed mode for one cell type: its JSON line as a dict."""
    out = subprocess.run([args.peer_python, args.peer_script, "--data", args.data, "--mode", "speed",
                          "--model", cell, "--steps", str(args.steps), "--sample_n", str(args.sample_n)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no message"])[-1]
        raise ValueError(f"the peer ({args.peer_python} {args.peer_script}) failed: {last}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_rounds(args, data_dir):
    """Time every cell type (and sampling, with the LSTM) for args.rounds rounds, ours then the peer's;
    returns (ours {cell: [tokens/s]}, the peer's {cell: [its JSON]}, sampling [runs], the LSTM model)."""
    cells = args.models.split(",")
    timers, lstm = {}, None
    for cell in cells:
        timers[cell], model = train_speed(data_dir, cell)
        if cell == "lstm":
            lstm = model
    peer = args.peer_python and args.peer_script
    ours, theirs, sampling = {cell: [] for cell in cells}, {cell: [] for cell in cells}, []
    for _ in range(args.rounds):  # ours, then the peer, cell by cell: both see the same machine state
        for cell in cells:
            ours[cell].append(timers[cell](args.steps))
            if peer:
                theirs[cell].append(peer_speed(args, cell))
            if cell == "lstm":
                sampling.append(sample_speed(lstm, args.sample_n, [int(n) for n in args.flat_n.split(",")]))
    return ours, theirs, sampling, lstm


def peer_ratios(result, ours, theirs, sampling):
    """The peer's medians, and ours divided by theirs (medians and each round), added to `result`."""
    median, cells = statistics.median, list(ours)
    result["peer_train_tokens_per_s"] = {
        cell: round(median(run["train_tokens_per_s"] for run in theirs[cell]), 1) for cell in cells}
    result["ratio_train"] = {cell: round(result["train_tokens_per_s"][cell]
                                         / result["peer_train_tokens_per_s"][cell], 2) for cell in cells}
    result["ratio_train_per_round"] = {
        cell: [round(a / b["train_tokens_per_s"], 2) for a, b in zip(ours[cell], theirs[cell])] for cell in cells}
    if sampling:
        peer_sampling = [run["sample_chars_per_s"] for run in theirs["lstm"]]
        result["peer_sample_chars_per_s"] = median(peer_sampling)
        result["ratio_sample"] = round(result["sample_chars_per_s"] / result["peer_sample_chars_per_s"], 2)
        result["ratio_sample_per_round"] = [round(a["sample_chars_per_s"] / b, 2)
                                            for a, b in zip(sampling, peer_sampling)]
    result["peer_torch"] = theirs[cells[0]][0]["torch"]


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.quiet_tensorflow(one_thread_per_op=True)
    work = tempfile.mkdtemp(prefix="char-rnn-speed-")
    try:
        data_dir = os.path.join(work, "data")
        os.makedirs(data_dir)
        shutil.copyfile(args.data, os.path.join(data_dir, "input.txt"))
        ours, theirs, sampling, lstm = timed_rounds(args, data_dir)
        result = {"project": "char-rnn-tensorflow", "rounds": args.rounds,
                  "train_tokens_per_s": {cell: round(statistics.median(runs), 1) for cell, runs in ours.items()}}
        for key in sampling[0] if sampling else ():
            result[key] = statistics.median(run[key] for run in sampling)
        if lstm is not None and args.logprobs_cost:
            result.update(logprobs_speed(lstm, args.sample_n))
        if lstm is not None and args.one_off_runs:
            result.update(one_off_latency(lstm, data_dir, work, args.one_off_runs))
        if lstm is not None and args.export:
            result.update(export_speed(lstm, data_dir, work, args.sample_n))
        if lstm is not None and args.server_clients:
            result.update(server_speed(lstm, data_dir, work, args.server_clients, args.server_seconds))
        if args.preprocess_mb:
            result.update(preprocess_speed(args.data, args.preprocess_mb, work))
        if args.peer_python and args.peer_script:
            peer_ratios(result, ours, theirs, sampling)
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
