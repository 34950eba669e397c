"""sample_server.py as an HTTP client sees it: a real server process on a free port, spoken to with urllib."""
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import train
from conftest import REPO, TINY_MODEL, make_data_dir, run_script

# The README's URL asks for prime=The, so the served model must know a capital T (the shared tiny corpus has none).
SERVED_TEXT = "The cat sat on the mat.\nThe dog sat on the log.\n" * 60
README_QUERY = "prime=The&n=200&sample_mode=2"
START_TIMEOUT_S = 120  # importing TensorFlow and loading the model, on a busy machine
REQUEST_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    """A tiny character-level model trained on text with capitals."""
    root = tmp_path_factory.mktemp("served")
    save = str(root / "save")
    code = train.main(["--data_dir", make_data_dir(root / "data", SERVED_TEXT), "--save_dir", save, *TINY_MODEL,
                       "--num_epochs", "3", "--print_every", "1000", "--seed", "1"])
    assert code == 0
    return save


def free_port():
    """A port nobody listens on right now (CherryPy cannot report the port it got for port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A sample_server.py process: url, process, and its log (stdout and stderr) in a file."""

    def __init__(self, save_dir, log_path, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(REPO, "sample_server.py"), "--save_dir", save_dir,
                 "--port", str(self.port), *map(str, flags)],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_until_ready(self):
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited early:\n{self.log()}"
            with contextlib.suppress(OSError):
                if get(self.url + "/health")[0] == 200:
                    return self
            time.sleep(0.2)
        raise AssertionError(f"the server did not answer /health within {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running_server(save_dir, log_path, *flags):
    server = Server(save_dir, log_path, *flags)
    try:
        yield server.wait_until_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(save_dir, tmp_path_factory):
    """One server for most tests, its queue long enough for the concurrency test's 32 clients."""
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    with running_server(save_dir, log_path, "--threads", 4, "--queue", 64, "--max_n", 500) as running:
        yield running


def get(url, timeout=REQUEST_TIMEOUT_S):
    """GET url; returns (status, headers, body as text), whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers, response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read().decode("utf-8")


def assert_one_line_of_plain_text(headers, body):
    assert headers.get_content_type() == "text/plain" and headers.get_content_charset() == "utf-8"
    assert body.endswith("\n") and body.count("\n") == 1, repr(body)
    assert "Traceback" not in body and "<html" not in body.lower()


def sample_cli(save_dir, *args):
    result = run_script("sample.py", "--save_dir", save_dir, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout[:-1]  # without its final newline


# ----------------------------------------------------------------------------------------------------------
# Answers


def test_readme_url_answers_what_sample_py_prints(server, save_dir):
    status, headers, body = get(f"{server.url}/?{README_QUERY}&seed=7")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["X-Seed"] == "7"
    # The server's default temperature is the original's 0.8.
    expected = sample_cli(save_dir, "--prime", "The", "-n", 200, "--sample", 2, "--temperature", 0.8, "--seed", 7)
    assert body == expected
    assert body.startswith("The") and len(body) == 3 + 200
    # The JSON endpoint gives the same text with the settings used.
    status, headers, body = get(f"{server.url}/sample.json?{README_QUERY}&seed=7")
    assert status == 200 and headers.get_content_type() == "application/json"
    assert json.loads(body) == {"text": expected, "prime": "The", "n": 200, "sample_mode": 2,
                                "temperature": 0.8, "seed": 7, "top_k": 0}


def test_every_parameter_reaches_the_generator(server, save_dir):
    query = "prime=The%20dog&n=50&sample_mode=1&temperature=1.5&seed=3&top_k=4"
    expected = sample_cli(save_dir, "--prime", "The dog", "-n", 50, "--sample", 1, "--temperature", 1.5,
                          "--seed", 3, "--top_k", 4)
    assert get(f"{server.url}/?{query}")[2] == expected


def test_defaults_are_the_original_servers(server):
    answer = json.loads(get(f"{server.url}/sample.json?seed=1")[2])
    text = answer.pop("text")
    assert answer == {"prime": "The ", "n": 200, "sample_mode": 2, "temperature": 0.8, "seed": 1, "top_k": 0}
    assert text.startswith("The ") and len(text) == 4 + 200


def test_without_a_seed_the_answer_names_the_seed_that_repeats_it(server):
    first = json.loads(get(f"{server.url}/sample.json?prime=The&n=60")[2])
    again = get(f"{server.url}/?prime=The&n=60&seed={first['seed']}")
    assert again[0] == 200 and again[2] == first["text"]
    status, headers, body = get(f"{server.url}/?prime=The&n=60")
    assert get(f"{server.url}/?prime=The&n=60&seed={headers['X-Seed']}")[2] == body


def test_health_names_the_model(server, save_dir):
    status, headers, body = get(server.url + "/health")
    assert status == 200 and body.startswith("ok: ") and save_dir in body and "lstm 1x16" in body
    assert_one_line_of_plain_text(headers, body)


# ----------------------------------------------------------------------------------------------------------
# Refusals


BAD_REQUESTS = [
    ("n=abc", "n must be an integer from 1 to 500"),
    ("n=-1", "n must be"),
    ("n=0", "n must be"),
    ("n=1000000000", "n must be"),
    ("n=99999999999999999999999999", "n must be"),
    ("n=5&n=6", "parameter n is given 2 times"),
    ("sample_mode=3", "sample_mode must be one of 0"),
    ("sample_mode=", "sample_mode must be"),
    ("temperature=0", "temperature must be a finite number > 0"),
    ("temperature=-1", "temperature must be"),
    ("temperature=nan", "temperature must be"),
    ("temperature=inf", "temperature must be"),
    ("seed=-5", "seed must be"),
    ("seed=99999999999999999999", "seed must be"),
    ("top_k=-1", "top_k must be"),
    ("colour=red", "unknown parameter 'colour'"),
    ("prime=" + "a" * 10_000, "prime is 10000 characters long; the limit is 1000"),
    ("prime=The%20Queen%21", "the model does not know: 'Q', 'u', '!'"),
    ("prime=%3Cb%3E%26", "the model does not know: '<', 'b', '>', '&'"),
    ("prime=%zz", "broken percent-escape"),
    ("prime=The%2", "broken percent-escape"),
    ("prime=%E9", "not UTF-8"),
]


@pytest.mark.parametrize("query, reason", BAD_REQUESTS, ids=[query[:30] for query, _ in BAD_REQUESTS])
def test_bad_request_gets_400_with_a_one_line_reason_and_the_server_keeps_serving(server, query, reason):
    status, headers, body = get(f"{server.url}/?{query}")
    assert status == 400, body
    assert_one_line_of_plain_text(headers, body)
    assert reason in body
    assert get(f"{server.url}/?prime=The&n=5")[0] == 200


def test_other_paths_and_methods_get_one_line_errors(server):
    status, headers, body = get(server.url + "/nowhere")
    assert status == 404 and "/nowhere" in body
    assert_one_line_of_plain_text(headers, body)
    status, headers, body = get(server.url + "/health?verbose=1")
    assert status == 400
    assert_one_line_of_plain_text(headers, body)
    request = urllib.request.Request(server.url + "/?n=5", data=b"prime=The", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S)
    assert refused.value.code == 405
    assert_one_line_of_plain_text(refused.value.headers, refused.value.read().decode())


# ----------------------------------------------------------------------------------------------------------
# Load


def test_concurrent_requests_get_what_each_gets_alone(server):
    queries = [f"prime=The&n=20&sample_mode={seed % 3}&seed={seed}" for seed in range(8)]
    alone = {query: get(f"{server.url}/?{query}")[2] for query in queries}
    assert len(set(alone.values())) > 1

    def client(index):
        answers = []
        for i in range(20):
            query = queries[(index + i) % len(queries)]
            status, _, body = get(f"{server.url}/?{query}")
            answers.append((status, body == alone[query]))
        return answers

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = [answer for answers in pool.map(client, range(32)) for answer in answers]
    assert len(answers) == 32 * 20
    assert answers == [(200, True)] * len(answers)


def test_flood_beyond_the_queue_gets_quick_503s_never_500(save_dir, tmp_path):
    flags = ["--threads", 1, "--queue", 1, "--max_n", 20_000]
    with running_server(save_dir, str(tmp_path / "server.log"), *flags) as server:
        def client(_):
            start = time.monotonic()
            status, headers, body = get(f"{server.url}/?prime=The&n=20000&seed=1")
            return status, time.monotonic() - start, headers, body

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            results = list(pool.map(client, range(48)))
        assert {status for status, *_ in results} == {200, 503}, [status for status, *_ in results]
        for status, _, headers, body in results:
            if status == 503:
                assert_one_line_of_plain_text(headers, body)
                assert "busy" in body and headers["Retry-After"] == "1"
        # A refusal does not wait for a turn: it comes quicker than an answer.
        seconds = {code: statistics.median(s for status, s, *_ in results if status == code) for code in (200, 503)}
        assert seconds[503] < seconds[200]
        assert get(server.url + "/health")[0] == 200


# ----------------------------------------------------------------------------------------------------------
# Start and stop


def test_missing_or_empty_save_dir_stops_the_server_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    # Both at once (each spends most of its time importing TensorFlow); one in the production environment, where
    # CherryPy logs nothing on screen, one in the development environment, where the engine's lines come first.
    cases = {missing: ["--production"], empty: []}
    processes = {save: subprocess.Popen([sys.executable, os.path.join(REPO, "sample_server.py"), "--save_dir",
                                         str(save), "--port", str(free_port()), *flags],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for save, flags in cases.items()}
    for save, process in processes.items():
        err = process.communicate(timeout=START_TIMEOUT_S)[1]
        assert process.returncode == 1
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert lines[-1].startswith("error: ") and str(save) in lines[-1], err
        if save == missing:
            assert len(lines) == 1, err


def test_sigterm_during_a_request_exits_0_within_seconds(save_dir, tmp_path):
    with running_server(save_dir, str(tmp_path / "server.log"), "--threads", 1, "--max_n", 10_000_000) as server:
        # A request long enough (about two seconds here) to be in the middle of generating when SIGTERM comes.
        start = time.monotonic()
        assert get(f"{server.url}/?prime=The&n=100000&seed=1")[0] == 200
        n = min(10_000_000, int(100_000 * 2.0 / (time.monotonic() - start)))
        answers = {}

        def ask(name, n):
            status = get(f"{server.url}/?prime=The&n={n}&seed=1")[0]
            answers[name] = (status, time.monotonic())

        generating = threading.Thread(target=ask, args=("generating", n))
        waiting = threading.Thread(target=ask, args=("waiting", 5))  # --threads 1: it waits for its turn
        generating.start()
        time.sleep(0.2)
        waiting.start()
        time.sleep(0.2)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=30)
        seconds = time.monotonic() - signalled
        generating.join()
        waiting.join()
    assert code == 0, server.log()
    assert seconds < 10
    # The request being generated is finished after the signal; the one waiting for its turn is turned away.
    assert answers["generating"][0] == 200 and answers["generating"][1] > signalled
    assert answers["waiting"][0] == 503
    assert "Traceback" not in server.log()
