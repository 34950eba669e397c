"""Export yardstick: characters per second of the exported SavedModel (export.py) at batch 1 and at batch --rows
through its generate_batch signature, plain and compiled by XLA (export.py --xla), beside sample.py's compiled
loop (Sampler.run, one sample at a time) and --rows concurrent clients of the batching server, in one run.

usage: python bench/export.py --data ../shared/data/tinyshakespeare/input.txt [-n 200] [--rows 32] [--rounds 3]
       python bench/export.py --save_dir save ...        # a trained model instead of an untrained 3 x 128 LSTM

One process per setup: each setup's process starts once (loads TensorFlow and its model, warms up) and then
measures when told to, so that the setups are measured in turns (each round in another order, as bench/server.py
orders them) and see the same state of a busy machine. A measurement runs whole calls for at least --seconds; its
characters per second count the generated tokens only (n per row; the model is character-level). The server is
sample_server.py with its defaults (batching on), asked by --rows clients at once (bench/server.py's clients).
Prints one JSON line per measurement, then a summary line: each setup's median, and the ratios (the median of
the rounds' ratios) of batch --rows to batch 1, of the export to sample.py and of the export to the server.
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
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cli  # noqa: E402
import server  # noqa: E402  (bench/server.py: its server start and clients)

SAMPLE_MODE = 1  # sample at every step: every row draws at every step, the most work per token
READY = "ready"
SERVER = "server"


def setups(rows):
    """{name: (export kind or None for sample.py's loop, rows per call)} of the worker processes."""
    return {"sample": (None, 1), "export_1": ("plain", 1), f"export_{rows}": ("plain", rows),
            "export_xla_1": ("xla", 1), f"export_xla_{rows}": ("xla", rows)}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--save_dir", help="save dir written by train.py (a character-level model)")
    model.add_argument("--data", help="a text whose vocabulary an untrained 3 x 128 LSTM (the defaults) is built "
                                      "for (untrained weights are as fast as trained ones)")
    parser.add_argument("-n", type=cli.positive_int, default=200, help="tokens per row (per request)")
    parser.add_argument("--rows", type=cli.positive_int, default=32,
                        help="rows per call of the batched export, and concurrent clients of the server")
    parser.add_argument("--prime", default="The", help="prime of every row")
    parser.add_argument("--seconds", type=cli.positive_float, default=8.0, help="length of one measurement")
    parser.add_argument("--rounds", type=cli.positive_int, default=3, help="measurements of each setup")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a setup's own process: see worker()
    parser.add_argument("--export_dir", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    work = tempfile.mkdtemp(prefix="char-rnn-bench-export-")
    workers, servers = {}, {}
    try:
        save_dir = os.path.abspath(args.save_dir) if args.save_dir else server.untrained_save_dir(args.data, work)
        exports = write_exports(save_dir, work)
        for name, (kind, rows) in setups(args.rows).items():
            workers[name] = start_worker(args, name, save_dir, exports.get(kind))
        client_args = types.SimpleNamespace(n=args.n, clients=[args.rows], prime=args.prime, seconds=args.seconds,
                                            max_requests=0)
        port = server.free_port()
        servers[SERVER] = (server.start_server(save_dir, client_args, port, REPO, []), port)
        model = server.wait_until_ready(*servers[SERVER])
        for name, process in workers.items():
            wait_for_worker(name, process)
        results = measure_in_turns(args, workers, servers[SERVER], client_args)
    except RuntimeError as error:
        return cli.fail(error, cli.EXIT_FAILURE)
    finally:
        server.stop_servers(servers)
        for process in workers.values():
            process.kill()
            process.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summarize(args, model, results)))
    return 0


def write_exports(save_dir, work):
    """{kind: export dir}: the save dir exported plain and with XLA, as export.py writes them."""
    cli.quiet_tensorflow()
    import exporter
    import savedir
    loaded = savedir.load(save_dir)
    exports = {kind: os.path.join(work, "export", kind, "1") for kind in ("plain", "xla")}
    for kind, export_dir in exports.items():
        exporter.write_export(loaded, export_dir, xla=kind == "xla")
    return exports


def start_worker(args, name, save_dir, export_dir):
    command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--save_dir", save_dir, "-n", str(args.n),
               "--rows", str(args.rows), "--prime", args.prime, "--seconds", str(args.seconds)]
    if export_dir:
        command += ["--export_dir", export_dir]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)


def wait_for_worker(name, process):
    line = process.stdout.readline().strip()
    if line != READY:
        raise RuntimeError(f"the {name} process did not start (exit code {process.wait()})")


def measure_in_turns(args, workers, server_and_port, client_args):
    """{setup: [chars/s of each round]}, every setup measured once per round, the order turned each round."""
    names = list(workers) + [SERVER]
    results = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in server.turns(names, round_):
            if name == SERVER:
                process, port = server_and_port
                latencies, failures, first_failure, seconds, *_ = server.measure(client_args, port, args.rows,
                                                                                 process.pid)
                if failures:
                    raise RuntimeError(f"the server answered {failures} requests with an error: {first_failure}")
                chars_per_s = len(latencies) * args.n / seconds
            else:
                workers[name].stdin.write("measure\n")
                workers[name].stdin.flush()
                chars_per_s = json.loads(workers[name].stdout.readline())["chars_per_s"]
            line = {"project": "char-rnn-tensorflow", "mode": "export", "setup": name, "round": round_,
                    "n": args.n, "chars_per_s": round(chars_per_s, 1)}
            print(json.dumps(line), flush=True)
            results[name].append(chars_per_s)
    return results


def summarize(args, model, results):
    """The medians of each setup, and the ratios that docs/export.md reports (each the median of the rounds')."""
    rows = args.rows
    summary = {"project": "char-rnn-tensorflow", "mode": "export_summary", "model": model, "n": args.n,
               "rows": rows, "rounds": args.rounds}
    for name, values in results.items():
        summary[f"{name}_chars_per_s"] = round(statistics.median(values), 1)
    pairs = {f"ratio_export_{rows}_to_export_1": (f"export_{rows}", "export_1"),
             f"ratio_export_xla_{rows}_to_export_xla_1": (f"export_xla_{rows}", "export_xla_1"),
             "ratio_export_xla_1_to_export_1": ("export_xla_1", "export_1"),
             "ratio_export_1_to_sample": ("export_1", "sample"),
             "ratio_export_xla_1_to_sample": ("export_xla_1", "sample"),
             f"ratio_export_{rows}_to_server_{rows}": (f"export_{rows}", SERVER),
             f"ratio_export_xla_{rows}_to_server_{rows}": (f"export_xla_{rows}", SERVER)}
    for field, (top, bottom) in pairs.items():
        summary[field] = round(statistics.median(a / b for a, b in zip(results[top], results[bottom])), 2)
    return summary


def worker(args):
    """A setup's process: warm up, print READY, then for each line on stdin measure once and print its JSON."""
    cli.quiet_tensorflow()
    kind, rows = setups(args.rows)[args.worker]
    run = export_runner(args.export_dir, args.prime, args.n, rows) if kind else sample_runner(args)
    calls = 0
    for _ in range(2):  # tracing, XLA's compilation, the first allocations
        run(calls)
        calls += 1
    print(READY, flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        made = 0
        while time.perf_counter() - start < args.seconds:
            made += run(calls)
            calls += 1
        print(json.dumps({"chars_per_s": made / (time.perf_counter() - start)}), flush=True)
    return 0


def sample_runner(args):
    """run(call) -> tokens made: one Sampler.run (sample.py's compiled loop) of --prime, a new seed each call."""
    from sampler import Sampler
    from settings import SampleSettings
    sampler = Sampler.load(args.save_dir)

    def run(call):
        sampler.run(SampleSettings(args.prime, args.n, SAMPLE_MODE, seed=call))
        return args.n
    return run


def export_runner(export_dir, prime, n, rows):
    """run(call) -> tokens made: one call of the export's generate_batch with `rows` rows of `prime`, each row
    its own seed."""
    import tensorflow as tf
    generate = tf.saved_model.load(export_dir).signatures["generate_batch"]
    settings = {"prime": tf.constant([prime] * rows), "n": tf.constant([n] * rows),
                "temperature": tf.constant([1.0] * rows), "sample_mode": tf.constant([SAMPLE_MODE] * rows),
                "top_k": tf.constant([0] * rows), "top_p": tf.constant([1.0] * rows)}

    def run(call):
        seeds = tf.constant([call * rows + row for row in range(rows)], tf.int64)
        generate(seed=seeds, **settings)["text"].numpy()
        return rows * n
    return run


if __name__ == "__main__":
    sys.exit(main())
