"""Serving yardstick: start sample_server.py on a save dir, let C clients request n tokens each for a while.

usage: python bench/server.py --save_dir save [--clients 8] [-n 200] [--seconds 10] [--threads 4]

Prints one JSON line: requests_per_s, tokens_per_s, p50_ms and p99_ms (latency of the answered requests, as
the clients see it), the count of requests that were not answered 200, and the settings. The clients run in this
process on the same machine and talk only to 127.0.0.1, each over one kept-alive connection; every request has
its own seed, so no two answers are alike.
"""
import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import cli  # noqa: E402
import sample_server  # noqa: E402

HOST = "127.0.0.1"
START_TIMEOUT_S = 180  # importing TensorFlow, loading and warming up the model
WARMUP_REQUESTS = 5  # per client, before the clock starts
REQUEST_TIMEOUT_S = 60


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save_dir", required=True, help="save dir written by train.py (the model to serve)")
    parser.add_argument("--clients", type=cli.positive_int, default=8, help="concurrent clients")
    parser.add_argument("-n", type=cli.positive_int, default=200, help="tokens per request")
    parser.add_argument("--prime", default="The", help="prime of every request")
    parser.add_argument("--seconds", type=cli.positive_float, default=10.0, help="how long the clients send")
    parser.add_argument("--max_requests", type=cli.non_negative_int, default=0,
                        help="stop after this many requests in all (0: only --seconds limits)")
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help="the server's --threads (default: its own default)")
    parser.add_argument("--queue", type=cli.non_negative_int, default=None,
                        help="the server's --queue (default: enough for every client)")
    return parser


def free_port():
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_server(args, port):
    """sample_server.py as a subprocess (production environment: no request log); returns the Popen."""
    flags = ["--save_dir", args.save_dir, "--host", HOST, "--port", str(port), "--production",
             "--max_n", str(args.n), "--queue", str(args.clients if args.queue is None else args.queue)]
    if args.threads is not None:
        flags += ["--threads", str(args.threads)]
    return subprocess.Popen([sys.executable, os.path.join(REPO, "sample_server.py"), *flags],
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

    def __init__(self, index, port, args, budget, go, stop):
        super().__init__(daemon=True)
        self.index, self.args, self.budget, self.go, self.stop = index, args, budget, go, stop
        self.ready = threading.Event()
        self.latencies, self.failures, self.first_failure = [], 0, None
        self.connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)

    def request(self, number):
        seed = self.index * 10 ** 9 + number
        self.connection.request("GET", f"/?prime={self.args.prime}&n={self.args.n}&sample_mode=1&seed={seed}")
        response = self.connection.getresponse()
        body = response.read()
        if response.will_close:
            self.connection.close()  # http.client reconnects on the next request
        if response.status != 200 and self.first_failure is None:
            self.first_failure = f"{response.status} {body.decode(errors='replace').strip()}"
        return response.status

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


def measure(args, port):
    """Run the clients against a ready server; returns (answered latencies, failures, first failure, seconds)."""
    budget, go, stop = Budget(args.max_requests or None), threading.Event(), threading.Event()
    clients = [Client(i, port, args, budget, go, stop) for i in range(args.clients)]
    for client in clients:
        client.start()
    for client in clients:
        client.ready.wait()
    start = time.perf_counter()
    go.set()
    timer = threading.Timer(args.seconds, stop.set)
    timer.start()
    for client in clients:
        client.join()
    seconds = time.perf_counter() - start
    timer.cancel()
    latencies = [s for client in clients for s in client.latencies]
    first_failure = next((client.first_failure for client in clients if client.first_failure), None)
    return latencies, sum(client.failures for client in clients), first_failure, seconds


def main(argv=None):
    args = build_parser().parse_args(argv)
    port = free_port()
    server = start_server(args, port)
    try:
        model = wait_until_ready(server, port)
        latencies, failures, first_failure, seconds = measure(args, port)
    except RuntimeError as error:
        return cli.fail(error, cli.EXIT_FAILURE)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    if not latencies:
        return cli.fail(f"no request was answered 200; the first answer was: {first_failure}", cli.EXIT_FAILURE)
    result = {"project": "char-rnn-tensorflow", "mode": "server", "model": model, "clients": args.clients,
              "threads": args.threads or sample_server.build_parser().get_default("threads"), "n": args.n,
              "requests": len(latencies), "not_200": failures, "seconds": round(seconds, 2),
              "requests_per_s": round(len(latencies) / seconds, 1),
              "tokens_per_s": round(len(latencies) * args.n / seconds),
              "p50_ms": round(1000 * percentile(latencies, 0.50), 1),
              "p99_ms": round(1000 * percentile(latencies, 0.99), 1)}
    if first_failure:
        result["first_failure"] = first_failure
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
