"""Serving yardstick: the server with batching (its defaults) beside the same server with batching off
(--max_batch 0: one request per thread, --threads at once), at several counts of concurrent clients, in one run.

usage: python bench/server.py --data ../shared/data/tinyshakespeare/input.txt [--clients 1,8,32] [-n 200]
       python bench/server.py --save_dir save ...        # a trained model instead of an untrained 3 x 128 LSTM
       python bench/server.py --data ... --setup "old=../old" --setup "batched=" --setup "off= --max_batch 0"

--setup NAME=CHECKOUT FLAGS... (repeated) replaces the two servers compared: NAME is the setup's name in the
output, CHECKOUT a checkout of another revision whose sample_server.py is started (empty: this one; e.g. made with
`git worktree add --detach ../old REVISION`), FLAGS what is passed to it beside the common ones. Each round then
starts one setup later (odd rounds backwards), and the summary gives each setup's ratio to the first, as the
median of the rounds' ratios.

For each client count, both servers are measured in turns (--rounds times, the order swapped each round) so that
both see the same state of the machine. Prints one JSON line per measurement (requests_per_s, tokens_per_s,
p50_ms and p99_ms of the answered requests as the clients see them, the count not answered 200), then one
summary line with the ratios of batched to batching off. On Linux each line also gives the CPU the server used
(cores, and milliseconds per answered request), read from /proc. The clients run in this process and talk only to
127.0.0.1, each over one kept-alive connection; every request has its own seed, so no two answers are alike.

The ceiling (on Linux, unless --ceiling 0): the requests/s that batching could reach on this machine at the largest
client count if every row of every block were filled and no core ever waited. It adds, per request, the CPU of a
request for one token (the batched server's and the clients': HTTP, the checks, the hand-offs, everything but the
tokens) and n times the CPU per token of blocks whose rows are all filled (timed in this process once the servers
have stopped, with every core busy, for the server's rows per batching thread and for all its rows on each thread;
the cheaper counts). The usable cores divided by that sum is the ceiling, and the ceiling over batching off's
requests/s is the best ratio this machine allows. GET /health's CPU per request is given beside it: what CherryPy
spends on a request that does nothing.
"""
import argparse
import copy
import http.client
import json
import os
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402

HOST = "127.0.0.1"
START_TIMEOUT_S = 180  # importing TensorFlow, loading and warming up the model
WARMUP_REQUESTS = 5  # per client, before the clock starts
REQUEST_TIMEOUT_S = 60


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--save_dir", help="save dir written by train.py (the model to serve)")
    model.add_argument("--data", help="a text whose vocabulary an untrained 3 x 128 LSTM (the defaults) is built "
                                      "for (untrained weights are as fast as trained ones)")
    parser.add_argument("--clients", type=client_counts, default=[1, 8, 32],
                        help="comma-separated counts of concurrent clients")
    parser.add_argument("-n", type=cli.positive_int, default=200, help="tokens per request")
    parser.add_argument("--prime", default="The", help="prime of every request")
    parser.add_argument("--seconds", type=cli.positive_float, default=10.0, help="how long the clients send")
    parser.add_argument("--rounds", type=cli.positive_int, default=2, help="measurements of each server per count")
    parser.add_argument("--max_requests", type=cli.non_negative_int, default=0,
                        help="stop a measurement after this many requests in all (0: only --seconds limits)")
    parser.add_argument("--ceiling", type=int, default=1, choices=[0, 1],
                        help="1: also measure the ceiling of batching on this machine (see above; about 20 s more; "
                             "only with a setup named batched)")
    parser.add_argument("--setup", type=setup, action="append", dest="setups", metavar='"NAME=CHECKOUT FLAGS"',
                        help="a server to measure (repeat it; see above); default: batched and batching_off")
    return parser


def client_counts(text):
    counts = [cli.positive_int(part) for part in text.split(",")]
    return counts


# The two servers compared: batching at its defaults, and batching off at the default --threads.
SETUPS = {"batched": (REPO, []), "batching_off": (REPO, ["--max_batch", "0"])}


def setup(text):
    """--setup "NAME=CHECKOUT FLAGS..." -> (NAME, (the checkout's absolute path, [FLAGS])); CHECKOUT empty: this
    one."""
    words = shlex.split(text)
    name, equals, checkout = words[0].partition("=") if words else ("", "", "")
    if not name or not equals:
        raise argparse.ArgumentTypeError(f'expected "NAME=CHECKOUT FLAGS...", got {text!r}')
    checkout = os.path.abspath(checkout) if checkout else REPO
    if not os.path.isfile(os.path.join(checkout, "sample_server.py")):
        raise argparse.ArgumentTypeError(f"{checkout} has no sample_server.py")
    return name, (checkout, words[1:])


def free_port():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(save_dir, args, port, checkout, flags):
    """The checkout's sample_server.py as a subprocess (production environment: no request log), run in the
    checkout so that it imports its own modules; returns the Popen."""
    flags = ["--save_dir", save_dir, "--host", HOST, "--port", str(port), "--production", "--max_n", str(args.n),
             "--queue", str(max(args.clients)), *flags]
    return subprocess.Popen([sys.executable, os.path.join(checkout, "sample_server.py"), *flags], cwd=checkout,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until_ready(server, port):
    """Poll /health until it answers; returns its body."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read().strip()}")
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
            connection.request("GET", "/health")
            return connection.getresponse().read().decode().strip()
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {START_TIMEOUT_S} s")


class Client(threading.Thread):
    """Warms up, sets `ready`, waits for `go`, then sends requests over one connection until `stop` is set or the
    budget is spent; keeps the latency of every 200 and counts the rest."""

    def __init__(self, index, port, args, budget, go, stop, path=None):
        super().__init__(daemon=True)
        self.path = path  # None: a sample request of --prime and n
        index += 1000 * port  # every measurement asks for other seeds
        self.index, self.args, self.budget, self.go, self.stop = index, args, budget, go, stop
        self.ready = threading.Event()
        self.latencies, self.failures, self.first_failure = [], 0, None
        self.connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)

    def request(self, number):
        seed = self.index * 10 ** 9 + number
        path = self.path or f"/?prime={self.args.prime}&n={self.args.n}&sample_mode=1&seed={seed}"
        try:
            response, body = self.get(path)
        except (http.client.RemoteDisconnected, ConnectionError):
            # A server may close a kept-alive connection between two requests, as HTTP allows: the GET is sent
            # again once, over a new connection, as browsers do.
            self.connection.close()
            try:
                response, body = self.get(path)
            except (http.client.HTTPException, OSError) as error:
                self.connection.close()
                if self.first_failure is None:
                    self.first_failure = f"no answer: {error!r}"
                return None
        if response.will_close:
            self.connection.close()  # http.client reconnects on the next request
        if response.status != 200 and self.first_failure is None:
            self.first_failure = f"{response.status} {body.decode(errors='replace').strip()}"
        return response.status

    def get(self, path):
        """(the response, its body) of GET path over the client's connection."""
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        return response, response.read()

    def run(self):
        for number in range(WARMUP_REQUESTS):
            self.request(number)
        self.ready.set()
        self.go.wait()
        number = WARMUP_REQUESTS
        while not self.stop.is_set() and self.budget.take():
            start = time.perf_counter()
            status = self.request(number)
            if status == 200:
                self.latencies.append(time.perf_counter() - start)
            else:
                self.failures += 1
            number += 1


class Budget:
    """A request count shared by the clients (None: unlimited)."""

    def __init__(self, count):
        self.count, self.lock = count, threading.Lock()

    def take(self):
        with self.lock:
            if self.count is None:
                return True
            self.count -= 1
            return self.count >= 0


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def cpu_seconds(pid):
    """CPU seconds (user and system) the process has used so far, or None where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime and stime, in clock ticks


def measure(args, port, clients, pid, path=None):
    """Run `clients` clients against a ready server (process `pid`), each asking for `path` (None: samples of
    args.n tokens); returns (answered latencies, failures, first failure, seconds, the server's CPU seconds or
    None, the clients' CPU seconds)."""
    budget, go, stop = Budget(args.max_requests or None), threading.Event(), threading.Event()
    clients = [Client(i, port, args, budget, go, stop, path) for i in range(clients)]
    for client in clients:
        client.start()
    for client in clients:
        client.ready.wait()
    cpu_start, start, clients_start = cpu_seconds(pid), time.perf_counter(), own_cpu_seconds()
    go.set()
    timer = threading.Timer(args.seconds, stop.set)
    timer.start()
    for client in clients:
        client.join()
    seconds, cpu_end, clients_cpu = time.perf_counter() - start, cpu_seconds(pid), own_cpu_seconds() - clients_start
    timer.cancel()
    latencies = [s for client in clients for s in client.latencies]
    first_failure = next((client.first_failure for client in clients if client.first_failure), None)
    cpu = None if cpu_start is None or cpu_end is None else cpu_end - cpu_start
    return latencies, sum(client.failures for client in clients), first_failure, seconds, cpu, clients_cpu


def own_cpu_seconds():
    """CPU seconds (user and system) this process has used so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def untrained_save_dir(data, work):
    """A save dir of an untrained 3 x 128 LSTM over the vocabulary of `data`."""
    cli.quiet_tensorflow()
    from model import CharRNN
    from settings import ModelConfig
    from speed import default_loader, write_save_dir
    data_dir = os.path.join(work, "data")
    os.makedirs(data_dir)
    shutil.copyfile(data, os.path.join(data_dir, "input.txt"))
    model = CharRNN(ModelConfig(default_loader(data_dir).vocab_size))  # the default cell, rnn_size and num_layers
    model.build_weights()
    return write_save_dir(model, data_dir, os.path.join(work, "save"))


def result_line(setup, clients, args, latencies, failures, first_failure, seconds, cpu, clients_cpu):
    result = {"project": "char-rnn-tensorflow", "mode": "server", "setup": setup, "clients": clients, "n": args.n,
              "requests": len(latencies), "not_200": failures, "seconds": round(seconds, 2),
              "requests_per_s": round(len(latencies) / seconds, 1),
              "tokens_per_s": round(len(latencies) * args.n / seconds),
              "p50_ms": round(1000 * percentile(latencies, 0.50), 1) if latencies else None,
              "p99_ms": round(1000 * percentile(latencies, 0.99), 1) if latencies else None}
    if cpu is not None and latencies:
        result["server_cpu_cores"] = round(cpu / seconds, 2)
        result["server_cpu_ms_per_request"] = round(1000 * cpu / len(latencies), 2)
    if latencies:
        result["clients_cpu_ms_per_request"] = round(1000 * clients_cpu / len(latencies), 2)
    if first_failure:
        result["first_failure"] = first_failure
    return result


def main(argv=None):
    args = build_parser().parse_args(argv)
    setups = dict(args.setups or SETUPS)
    work = tempfile.mkdtemp(prefix="char-rnn-bench-server-")
    servers = {}
    try:
        save_dir = os.path.abspath(args.save_dir) if args.save_dir else untrained_save_dir(args.data, work)
        for setup, (checkout, flags) in setups.items():
            port = free_port()
            servers[setup] = (start_server(save_dir, args, port, checkout, flags), port)
        model = [wait_until_ready(server, port) for server, port in servers.values()][0]
        results = measure_in_turns(args, setups, servers)
        floors = None
        if args.ceiling and set(SETUPS) <= set(setups) and cpu_seconds(os.getpid()) is not None:
            floors = request_floors(args, *servers["batched"])
        stop_servers(servers)
        token_ms = block_cpu_ms_per_token(save_dir, args) if floors else None
    except RuntimeError as error:
        return cli.fail(error, cli.EXIT_FAILURE)
    finally:
        stop_servers(servers)
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(args, setups, model, results)
    if floors:
        summary |= ceiling(args, floors, token_ms, summary)
    print(json.dumps(summary))
    return 0


def measure_in_turns(args, setups, servers):
    """Measure each setup's server at each client count, args.rounds times, the setups in turns (see turns);
    prints each measurement's line and returns them: {(setup, clients): [line of each round]}."""
    results = {}
    for clients in args.clients:
        for round_ in range(args.rounds):
            for setup in turns(list(setups), round_):
                server, port = servers[setup]
                measured = measure(args, port, clients, server.pid)
                line = result_line(setup, clients, args, *measured)
                print(json.dumps(line), flush=True)
                results.setdefault((setup, clients), []).append(line)
    return results


def summarize(args, setups, model, results):
    """The summary of measure_in_turns' results: the median of the rounds for each setup and client count, and
    the ratios between the setups."""
    summary = {"project": "char-rnn-tensorflow", "mode": "server_summary", "model": model, "n": args.n,
               "rounds": args.rounds}
    for clients in args.clients:
        for setup in setups:
            lines = results[(setup, clients)]
            summary[f"{setup}_{clients}_requests_per_s"] = median(line["requests_per_s"] for line in lines)
            summary[f"{setup}_{clients}_p50_ms"] = median(line["p50_ms"] for line in lines)
            summary[f"{setup}_{clients}_p99_ms"] = median(line["p99_ms"] for line in lines)
            summary[f"{setup}_{clients}_not_200"] = sum(line["not_200"] for line in lines)
            summary[f"{setup}_{clients}_server_cpu_ms_per_request"] = median(
                line.get("server_cpu_ms_per_request") for line in lines)
        if args.setups:
            summary |= ratios_to_first(list(setups), clients, results)
        else:
            summary[f"ratio_{clients}_clients"] = round(summary[f"batched_{clients}_requests_per_s"]
                                                        / summary[f"batching_off_{clients}_requests_per_s"], 2)
    return summary


def turns(setups, round_):
    """The order of the setups' measurements in a round: each round starts one setup later, and odd rounds run
    backwards, so that no setup always follows the same one (two setups: swapped each round)."""
    shift = round_ // 2 % len(setups)
    order = setups[shift:] + setups[:shift]
    return order if round_ % 2 == 0 else order[::-1]


def ratios_to_first(setups, clients, results):
    """Each setup's requests/s over the first setup's, round by round (the two measured in the same round, close
    in time): the median and each round's ratio, as summary fields."""
    first = [line["requests_per_s"] for line in results[(setups[0], clients)]]
    fields = {}
    for setup in setups[1:]:
        rounds = [line["requests_per_s"] / base if base else None
                  for line, base in zip(results[(setup, clients)], first)]
        fields[f"ratio_{setup}_to_{setups[0]}_{clients}_clients"] = median(rounds, 2)
        fields[f"ratios_{setup}_to_{setups[0]}_{clients}_clients"] = [
            None if ratio is None else round(ratio, 2) for ratio in rounds]
    return fields


def stop_servers(servers):
    """SIGTERM the servers and wait for them; empties `servers`."""
    for server, _ in servers.values():
        server.send_signal(signal.SIGTERM)
    for server, _ in servers.values():
        server.wait(timeout=60)
    servers.clear()


def request_floors(args, server, port):
    """The batched server's CPU per request apart from the tokens, at the largest client count: (GET /health's
    line, that of requests for one token); each line's CPU counts the server's and the clients'."""
    clients, bare = max(args.clients), copy.copy(args)
    lines = []
    for n, path in ((0, "/health"), (1, None)):
        bare.n = n
        lines.append(result_line("batched", clients, bare, *measure(bare, port, clients, server.pid, path)))
        lines[-1]["path"] = path or "/?n=1"
        print(json.dumps(lines[-1]), flush=True)
    return lines


def block_cpu_ms_per_token(save_dir, args):
    """{rows: CPU milliseconds per token of the batching server's blocks with every row filled and every core
    busy}: as many batching threads as the server runs (the defaults, on this machine's cores), each with `rows`
    rows, for the server's rows per thread and for all its rows on each thread. The threads make as many requests
    of `--prime` as they have rows, submitted together so that they start and end together; timed after one round
    that compiles the block. (A thread alone would count the CPU that TensorFlow spends spreading parts of each
    block over the idle cores, for no gain in time: with every core busy it spends none.)"""
    cli.quiet_tensorflow()
    import batching
    import sample_server
    from sampler import GENERATE_BLOCK, Sampler
    from settings import SampleSettings
    sampler, blocks = Sampler.load(save_dir), 10
    max_batch = sample_server.build_parser().get_default("max_batch")
    threads = batching.default_batchers(max_batch, cli.usable_cores())
    cpu_ms = {}
    for rows in sorted({batching.split(max_batch, threads)[0], max_batch}):
        pool = batching.BatcherPool(sampler, rows * threads, max_wait_s=10.0, max_waiting=0, count=threads)

        def full_rows(n):
            generations = [pool.submit(SampleSettings(args.prime, n, seed=row)) for row in range(rows * threads)]
            for generation in generations:
                "".join(generation)
        try:
            full_rows(GENERATE_BLOCK)  # compiles the block for this row count
            start = own_cpu_seconds()
            full_rows(blocks * GENERATE_BLOCK)
            cpu_ms[rows] = 1000 * (own_cpu_seconds() - start) / (rows * threads * blocks * GENERATE_BLOCK)
        finally:
            pool.close()
    return cpu_ms


def ceiling(args, floors, token_ms, summary):
    """The ceiling of batching at the largest client count (see the module's docstring), as summary fields."""
    clients = max(args.clients)
    health, one_token = (line["server_cpu_ms_per_request"] + line["clients_cpu_ms_per_request"] for line in floors)
    requests_per_s = 1000 * cli.usable_cores() / (one_token + args.n * min(token_ms.values()))
    return {f"ceiling_{clients}_health_cpu_ms_per_request": round(health, 2),
            f"ceiling_{clients}_cpu_ms_per_request_without_tokens": round(one_token, 2),
            **{f"ceiling_cpu_ms_per_token_{rows}_rows": round(ms, 4) for rows, ms in token_ms.items()},
            f"ceiling_{clients}_requests_per_s": round(requests_per_s, 1),
            f"ceiling_ratio_{clients}_clients": round(
                requests_per_s / summary[f"batching_off_{clients}_requests_per_s"], 2)}


def median(values, digits=1):
    values = [value for value in values if value is not None]
    return round(statistics.median(values), digits) if values else None


if __name__ == "__main__":
    sys.exit(main())
