"""sample_server.py as an HTTP client sees it: a real server process on a free port, spoken to with urllib."""
import concurrent.futures
import http.client
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
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import train
from conftest import REPO, TINY_MODEL, make_data_dir, run_script
from sampler import GENERATE_BLOCK, Sampler
from servers import (
    REQUEST_TIMEOUT_S,
    START_TIMEOUT_S,
    Server,
    end_process,
    free_port,
    get,
    post_json,
    raw_exchange,
    read_events,
    running_server,
    stream,
)
from settings import MAX_LOGPROBS, MAX_N, MAX_SEED, SampleSettings

# The README's URL asks for prime=The, so the served model must know a capital T (the shared tiny corpus has none).
SERVED_TEXT = "The cat sat on the mat.\nThe dog sat on the log.\n" * 60
README_QUERY = "prime=The&n=200&sample_mode=2"
NO_PENALTIES = {"frequency_penalty": 0.0, "presence_penalty": 0.0}
# Every test here starts a server or a script.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    """A tiny character-level model trained on text with capitals."""
    root = tmp_path_factory.mktemp("served")
    save = str(root / "save")
    code = train.main(["--data_dir", make_data_dir(root / "data", SERVED_TEXT), "--save_dir", save, *TINY_MODEL,
                       "--num_epochs", "3", "--print_every", "1000", "--seed", "1"])
    assert code == 0
    return save


@pytest.fixture(scope="module")
def server(save_dir, tmp_path_factory):
    """One server for most tests (batching at its defaults: up to 32 rows), its queue long enough for the
    concurrency test's 32 clients."""
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    with running_server(save_dir, log_path, "--queue", 64, "--max_n", 500) as running:
        yield running


# A second server with every sampling flag away from its default, on another loopback address.
FLAGGED_HOST = "127.0.0.2"
FLAGGED_TEMPERATURE = 1.7
FLAGGED_MAX_N = 50
FLAGGED_MAX_PRIME = 20


@pytest.fixture(scope="module")
def flagged_server(save_dir, tmp_path_factory):
    log_path = str(tmp_path_factory.mktemp("flagged") / "server.log")
    flags = ["--production", "--temperature", FLAGGED_TEMPERATURE, "--max_n", FLAGGED_MAX_N,
             "--max_prime", FLAGGED_MAX_PRIME]
    with running_server(save_dir, log_path, *flags, host=FLAGGED_HOST) as running:
        yield running


@pytest.fixture(scope="module")
def local_sampler(save_dir):
    """The served model in this process, to say what the server should answer."""
    return Sampler.load(save_dir)


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
                                "temperature": 0.8, "seed": 7, "top_k": 0, "top_p": 1.0, **NO_PENALTIES,
                                "logprobs": None}


def test_every_parameter_reaches_the_generator(server, save_dir):
    query = "prime=The%20dog&n=50&sample_mode=1&temperature=1.5&seed=3&top_k=4"
    expected = sample_cli(save_dir, "--prime", "The dog", "-n", 50, "--sample", 1, "--temperature", 1.5,
                          "--seed", 3, "--top_k", 4)
    assert get(f"{server.url}/?{query}")[2] == expected
    # top_p, as sample.py's --top_p (and not the same text as without it).
    expected = sample_cli(save_dir, "--prime", "The dog", "-n", 50, "--sample", 1, "--temperature", 1.5,
                          "--seed", 3, "--top_p", 0.6)
    assert get(f"{server.url}/?prime=The%20dog&n=50&sample_mode=1&temperature=1.5&seed=3&top_p=0.6")[2] == expected
    assert get(f"{server.url}/?prime=The%20dog&n=50&sample_mode=1&temperature=1.5&seed=3")[2] != expected


def test_defaults_are_the_original_servers(server):
    answer = json.loads(get(f"{server.url}/sample.json?seed=1")[2])
    text = answer.pop("text")
    assert answer == {"prime": "The ", "n": 200, "sample_mode": 2, "temperature": 0.8, "seed": 1, "top_k": 0,
                      "top_p": 1.0, **NO_PENALTIES, "logprobs": None}
    assert text.startswith("The ") and len(text) == 4 + 200


def test_without_a_seed_the_answer_names_the_seed_that_repeats_it(server):
    first = json.loads(get(f"{server.url}/sample.json?prime=The&n=60")[2])
    again = get(f"{server.url}/?prime=The&n=60&seed={first['seed']}")
    assert again[0] == 200 and again[2] == first["text"]
    status, headers, body = get(f"{server.url}/?prime=The&n=60")
    assert get(f"{server.url}/?prime=The&n=60&seed={headers['X-Seed']}")[2] == body
    # The server picks a new seed for every request.
    seeds = {get(f"{server.url}/?prime=The&n=5")[1]["X-Seed"] for _ in range(3)}
    assert len(seeds) == 3


def test_limits_are_inclusive(server, local_sampler):
    # The longest prime (--max_prime, default 1000) and the largest n (--max_n 500 here) are served.
    prime = ("The cat sat on the mat.\n" * 50)[:1000]
    status, _, body = get(f"{server.url}/?prime={urllib.parse.quote(prime)}&n=5&seed=1")
    assert status == 200 and body == local_sampler.sample(prime, 5, 2, 0.8, 1)
    status, _, body = get(f"{server.url}/?prime={urllib.parse.quote(prime + 'T')}&n=5&seed=1")
    assert status == 400 and "prime is 1001 characters long; the limit is 1000 (--max_prime)" in body
    for n in (1, 500):
        status, _, body = get(f"{server.url}/?prime=The&n={n}&seed=2")
        assert status == 200 and len(body) == 3 + n
    status, _, body = get(f"{server.url}/?prime=The&n=501&seed=2")
    assert status == 400 and "n must be an integer from 1 to 500 (--max_n)" in body
    # Seeds from 0 to the largest, and top_k from 0 to the largest (which keeps every token, as 0 does).
    for seed in (0, MAX_SEED):
        status, headers, body = get(f"{server.url}/?prime=The&n=40&sample_mode=1&seed={seed}")
        assert status == 200 and headers["X-Seed"] == str(seed)
        assert body == local_sampler.sample("The", 40, 1, 0.8, seed)
        for top_k in (0, MAX_N):
            assert get(f"{server.url}/?prime=The&n=40&sample_mode=1&seed={seed}&top_k={top_k}")[2] == body


def test_empty_prime_answers_what_sample_py_prints(server, save_dir):
    status, _, body = get(f"{server.url}/?prime=&n=40&sample_mode=1&seed=3")
    assert status == 200
    assert body == sample_cli(save_dir, "--prime", "", "-n", 40, "--sample", 1, "--temperature", 0.8, "--seed", 3)


def test_flags_set_the_default_temperature_and_the_limits(flagged_server, local_sampler):
    url = flagged_server.url
    answer = json.loads(get(f"{url}/sample.json?n=30&sample_mode=1&seed=4")[2])
    assert answer["temperature"] == FLAGGED_TEMPERATURE
    assert answer["text"] == local_sampler.sample("The ", 30, 1, FLAGGED_TEMPERATURE, 4)
    assert get(f"{url}/?n=30&sample_mode=1&seed=4&temperature=0.8")[2] != answer["text"]
    status, _, body = get(f"{url}/?prime=The&n={FLAGGED_MAX_N}")
    assert status == 200 and len(body) == 3 + FLAGGED_MAX_N
    status, _, body = get(f"{url}/?prime=The&n={FLAGGED_MAX_N + 1}")
    assert status == 400 and f"n must be an integer from 1 to {FLAGGED_MAX_N} (--max_n)" in body
    prime = ("The cat sat on the mat." * 2)[:FLAGGED_MAX_PRIME]
    status, _, body = get(f"{url}/?prime={urllib.parse.quote(prime)}&n=5")
    assert status == 200 and body.startswith(prime)
    status, _, body = get(f"{url}/?prime={urllib.parse.quote(prime + '.')}&n=5")
    assert status == 400 and f"the limit is {FLAGGED_MAX_PRIME} (--max_prime)" in body
    assert json.loads(get(f"{url}/sample.json")[2])["n"] == min(200, FLAGGED_MAX_N)  # the default n obeys --max_n


def test_the_start_prints_no_checker_warning(server):
    # Every start printed CherryPy's warning that server.socket_timeout was a float where it expects an int. The
    # checker runs after the model is loaded and before the server listens: its lines are in the log by now.
    log = server.log()
    assert "ENGINE Model ready" in log  # the engine's lines are on screen without --production
    assert "CherryPy Checker" not in log and "socket_timeout" not in log, log


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
    # Larger than int32: refused, never wrapped round (2**32 + 5 would sample with top_k 5).
    ("top_k=4294967301", "top_k must be an integer from 0 to 1073741824"),
    ("top_k=1073741825", "top_k must be an integer from 0 to 1073741824"),
    ("top_p=0", "top_p must be a number in (0, 1]"),
    ("top_p=1.5", "top_p must be a number in (0, 1]"),
    ("top_p=nan", "top_p must be a number in (0, 1]"),
    ("frequency_penalty=2.5", "frequency_penalty must be a number from -2 to 2"),
    ("presence_penalty=-3", "presence_penalty must be a number from -2 to 2"),
    ("presence_penalty=nan", "presence_penalty must be a number from -2 to 2"),
    ("logprobs=6", "logprobs must be an integer from 0 to 5"),
    ("logprobs=-1", "logprobs must be an integer >= 0"),
    ("seed=9223372036854775808", "seed must be an integer in [0, 9223372036854775807]"),
    ("n=501", "n must be an integer from 1 to 500 (--max_n)"),
    ("colour=red", "unknown parameter 'colour'"),
    ("prime=" + "a" * 10_000, "prime is 10000 characters long; the limit is 1000"),
    ("prime=" + "a" * 1001, "prime is 1001 characters long; the limit is 1000"),
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


# Requests of the load test: lengths within a block, exactly one, just over, several; every mode; filters.
LOAD_REQUESTS = [
    SampleSettings("The", 20, mode=0, temperature=0.8, seed=0),
    SampleSettings("The", GENERATE_BLOCK, mode=1, temperature=0.8, seed=1),
    SampleSettings("The ", GENERATE_BLOCK + 1, mode=2, temperature=0.8, seed=2),
    SampleSettings("The dog", 300, mode=1, temperature=1.2, seed=3, top_k=4),
    SampleSettings("", 57, mode=2, temperature=0.8, seed=4),
    SampleSettings("The cat", 200, mode=1, temperature=0.6, seed=5, top_p=0.7),
    SampleSettings("he", 5, mode=1, temperature=0.8, seed=2 ** 40),
    SampleSettings("The mat", 450, mode=2, temperature=1.0, seed=7),
]


def request_over(protocol, url, settings):
    """Ask for `settings` over GET /, POST /generate or GET /stream: (status, text)."""
    fields = {"prime": settings.prime, "n": settings.n, "sample_mode": settings.mode,
              "temperature": settings.temperature, "seed": settings.seed, "top_k": settings.top_k,
              "top_p": settings.top_p}
    query = urllib.parse.urlencode(fields)
    if protocol == "GET":
        status, _, body = get(f"{url}/?{query}")
        return status, body
    if protocol == "POST":
        status, _, answer = post_json(f"{url}/generate", fields)
        return status, answer.get("text")
    status, _, events = stream(f"{url}/stream?{query}")
    assert events[-1] == ("done", {**fields, **NO_PENALTIES, "logprobs": 0, "tokens": settings.n}), events[-1]
    return status, "".join(data["text"] for name, data in events if name == "text")


def metric_samples(url):
    """GET /metrics, read with prometheus_client's parser: {(name, labels as sorted tuples): value}."""
    status, headers, body = get(url + "/metrics")
    assert status == 200 and headers.get_content_type() == "text/plain"
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body) for sample in family.samples}


def test_32_clients_over_get_post_and_stream_get_what_each_gets_alone(server, local_sampler):
    alone = [local_sampler.run(settings) for settings in LOAD_REQUESTS]
    assert len(set(alone)) == len(alone)
    before = metric_samples(server.url)

    def client(index):
        answers = []
        for i in range(20):
            which = (index + i) % len(LOAD_REQUESTS)
            status, text = request_over(("GET", "POST", "stream")[(index + i) % 3], server.url, LOAD_REQUESTS[which])
            answers.append((status, text == alone[which]))
        return answers

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = [answer for answers in pool.map(client, range(32)) for answer in answers]
    assert len(answers) == 32 * 20
    assert answers == [(200, True)] * len(answers)
    # They were generated together: many blocks had more than one row.
    after = metric_samples(server.url)
    one_row = ("char_rnn_batch_rows_bucket", (("le", "1.0"),))
    blocks = after[("char_rnn_batch_rows_count", ())] - before[("char_rnn_batch_rows_count", ())]
    shared = blocks - (after[one_row] - before[one_row])
    assert shared > blocks / 2, (shared, blocks)
    tokens = after[("char_rnn_tokens_generated_total", ())] - before[("char_rnn_tokens_generated_total", ())]
    assert tokens == 80 * sum(settings.n for settings in LOAD_REQUESTS)
    for endpoint in ("/", "/generate", "/stream"):
        key = ("char_rnn_requests_total", (("endpoint", endpoint), ("status", "200")))
        assert after[key] - before.get(key, 0) >= 213


# ----------------------------------------------------------------------------------------------------------
# Streaming, JSON, metrics, the web page


def test_stream_sends_the_text_as_it_is_made_then_the_seed_and_token_count(server):
    with urllib.request.urlopen(f"{server.url}/stream?prime=The&n=300&sample_mode=1&seed=11",
                                timeout=REQUEST_TIMEOUT_S) as response:
        assert response.status == 200 and response.headers.get_content_type() == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        events = list(read_events(response))
    names = [name for name, _ in events]
    assert names == ["text"] * (len(names) - 1) + ["done"] and len(names) >= 4  # the prime, then each block
    assert events[0] == ("text", {"text": "The"})
    assert "".join(data["text"] for name, data in events[:-1]) == get(f"{server.url}/?prime=The&n=300&sample_mode=1"
                                                                      f"&seed=11")[2]
    assert events[-1][1]["seed"] == 11 and events[-1][1]["tokens"] == 300
    # Without a seed, the done event names the one that repeats it.
    status, _, events = stream(f"{server.url}/stream?prime=The&n=40")
    seed = events[-1][1]["seed"]
    text = "".join(data["text"] for name, data in events[:-1])
    assert get(f"{server.url}/?prime=The&n=40&seed={seed}")[2] == text
    # A bad parameter is refused before the stream starts, with the one line of GET /.
    status, headers, body = stream(f"{server.url}/stream?temperature=0")
    assert status == 400 and "temperature must be a finite number > 0" in body
    assert_one_line_of_plain_text(headers, body)


BAD_BODIES = [
    (b'{"prime": "The", ', 400, "the body is not valid JSON"),
    (b"", 400, "the body is not valid JSON"),
    (b"\xff\xfe\x00", 400, "the body is not valid JSON"),
    (b"[1, 2]", 400, "the body must be a JSON object"),
    (b'"The"', 400, "the body must be a JSON object"),
    (b'{"prime": "The", "colour": "red"}', 400, "unknown field 'colour'"),
    # A repeated field is refused as a repeated query parameter is, never the last value taken.
    (b'{"n": 20, "n": 30}', 400, "field 'n' is given 2 times; give it once"),
    (b'{"seed": 1, "prime": "The", "seed": null, "seed": 2}', 400, "field 'seed' is given 3 times"),
    (b'{"prime": {"a": 1, "a": 2}}', 400, "field 'a' is given 2 times"),
    (b'{"n": "5"}', 400, "n must be a JSON integer"),
    (b'{"n": 5.0}', 400, "n must be a JSON integer"),
    (b'{"n": true}', 400, "n must be a JSON integer"),
    (b'{"n": 501}', 400, "n must be an integer from 1 to 500 (--max_n)"),
    (b'{"n": 0}', 400, "n must be an integer from 1 to 500"),
    (b'{"prime": 5}', 400, "prime must be a JSON string"),
    (b'{"prime": "The Queen!"}', 400, "the model does not know: 'Q', 'u', '!'"),
    (b'{"temperature": NaN}', 400, "NaN is not a JSON number"),
    (b'{"temperature": 1e999}', 400, "temperature must be a finite number > 0"),
    (b'{"temperature": -1}', 400, "temperature must be a finite number > 0"),
    (b'{"sample_mode": 3}', 400, "sample_mode must be one of 0"),
    (b'{"seed": -1}', 400, "seed must be an integer >= 0"),
    (b'{"top_k": 4294967301}', 400, "top_k must be an integer from 0 to 1073741824"),
    (b'{"top_p": 0}', 400, "top_p must be a number in (0, 1]"),
    (b'{"frequency_penalty": "1"}', 400, "frequency_penalty must be a JSON number"),
    (b'{"presence_penalty": 2.01}', 400, "presence_penalty must be a number from -2 to 2"),
    (b'{"logprobs": 1.5}', 400, "logprobs must be a JSON integer"),
    (b'{"logprobs": 9}', 400, "logprobs must be an integer from 0 to 5"),
    (b"[" * 100_000, 413, "the limit is"),
    (b'{"prime": "' + b"a" * 20_000 + b'"}', 413, "the limit is"),
]


@pytest.mark.parametrize("body, status, reason", BAD_BODIES, ids=[body[:20].decode("latin-1")
                                                                   for body, _, _ in BAD_BODIES])
def test_post_generate_refuses_a_bad_body_with_a_json_reason(server, body, status, reason):
    answer_status, headers, answer = post_json(f"{server.url}/generate", body)
    assert (answer_status, headers.get_content_type()) == (status, "application/json")
    assert list(answer) == ["error"] and reason in answer["error"] and "\n" not in answer["error"]


def test_post_generate_answers_the_text_and_settings_as_json(server):
    status, headers, answer = post_json(f"{server.url}/generate", {"prime": "The", "n": 200, "sample_mode": 2,
                                                                    "seed": 7})
    assert status == 200 and headers.get_content_type() == "application/json"
    assert answer == {"text": get(f"{server.url}/?{README_QUERY}&seed=7")[2], "prime": "The", "n": 200,
                      "sample_mode": 2, "temperature": 0.8, "seed": 7, "top_k": 0, "top_p": 1.0, **NO_PENALTIES,
                      "logprobs": None, "tokens": 200}
    # Every field has the default of GET /; seed null picks one and names it.
    status, _, answer = post_json(f"{server.url}/generate", {"seed": None})
    assert status == 200 and answer["prime"] == "The " and answer["n"] == 200 and isinstance(answer["seed"], int)
    # Other methods are refused, in JSON too.
    status, headers, body = get(f"{server.url}/generate")
    assert status == 405 and headers["Allow"] == "POST" and "error" in json.loads(body)


def test_penalties_and_logprobs_reach_the_generator_on_every_surface(server, local_sampler):
    settings = SampleSettings("The ", 150, 1, 0.8, 5, frequency_penalty=0.7, presence_penalty=-0.4, logprobs=3)
    [expected] = local_sampler.samples(settings, 1)
    query = "prime=The%20&n=150&sample_mode=1&seed=5&frequency_penalty=0.7&presence_penalty=-0.4"
    assert get(f"{server.url}/?{query}")[2] == expected.text
    assert expected.text != local_sampler.run(SampleSettings("The ", 150, 1, 0.8, 5))  # the penalties act
    status, _, answer = post_json(f"{server.url}/generate", {"prime": "The ", "n": 150, "sample_mode": 1, "seed": 5,
                                                              "frequency_penalty": 0.7, "presence_penalty": -0.4,
                                                              "logprobs": 3})
    assert status == 200 and answer["text"] == expected.text and answer["frequency_penalty"] == 0.7
    logprobs = answer["logprobs"]
    assert logprobs["tokens"] == [detail.token for detail in expected.logprobs]
    assert logprobs["text_offset"] == [detail.text_offset for detail in expected.logprobs]
    assert [list(top) for top in logprobs["top_logprobs"]] == [[t for t, _ in d.top] for d in expected.logprobs]
    for got, detail in zip(logprobs["token_logprobs"], expected.logprobs, strict=True):
        assert got == pytest.approx(detail.logprob, abs=1e-5)
    assert json.loads(get(f"{server.url}/sample.json?{query}&logprobs=3")[2])["logprobs"]["tokens"] == \
        logprobs["tokens"]
    # The stream's text events carry their tokens: [token, logprob, [[alternative, logprob], ...], text_offset].
    status, _, events = stream(f"{server.url}/stream?{query}&logprobs=3")
    tokens = [token for name, data in events if name == "text" for token in data["tokens"]]
    assert [token[0] for token in tokens] == logprobs["tokens"]
    assert [token[3] for token in tokens] == logprobs["text_offset"]
    assert all(len(token[2]) == 3 for token in tokens)
    assert "tokens" not in stream(f"{server.url}/stream?{query}")[2][1][1]  # none unless asked


# Requests whose body stops arriving: shorter than its Content-Length, or chunked and stalled after a chunk.
HALF_SENT_BODIES = [
    b'POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"n": 5',
    b'POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n'
    b'5\r\n{"n":\r\n',
]


def test_a_post_body_that_stops_arriving_gets_408_counted_and_no_traceback(server):
    before, log_before = metric_samples(server.url), len(server.log())
    for request in HALF_SENT_BODIES:
        status, headers, body = raw_exchange(server.url, request)  # answered after --socket_timeout (2 s)
        answer = (status, headers.get("content-type"), headers.get("connection"))
        assert answer == (408, "application/json", "close"), body
        assert "the body stopped arriving" in json.loads(body)["error"] and b"\n" not in body
    assert get(f"{server.url}/?prime=The&n=5")[0] == 200
    after = metric_samples(server.url)
    key = ("char_rnn_requests_total", (("endpoint", "/generate"), ("status", "408")))
    assert after.get(key, 0) - before.get(key, 0) == len(HALF_SENT_BODIES)
    assert "Traceback" not in server.log()[log_before:]


def test_a_malformed_chunked_body_gets_400_in_json_and_its_connection_closed(server):
    request = (b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{\"n\": 5}\r\n0\r\n\r\n")
    status, headers, body = raw_exchange(server.url, request)
    assert (status, headers.get("content-type"), headers.get("connection")) == (400, "application/json", "close"), body
    assert "the chunked body is malformed" in json.loads(body)["error"]  # one answer: the rest was not read as another


def test_web_page_at_ui_and_to_a_browser_at_the_root(server):
    status, headers, page = get(server.url + "/ui")
    assert status == 200 and headers.get_content_type() == "text/html"
    for element in ('id="prime"', 'id="n"', 'id="sample_mode"', 'id="temperature"', 'id="top_k"',
                    'id="seed_input"', 'id="generate"', 'id="output"', 'id="error"', 'name="viewport"'):
        assert element in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere: it works offline
    request = urllib.request.Request(server.url + "/", headers={"Accept": "text/html,application/xhtml+xml"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        assert response.read().decode("utf-8") == page
    # With parameters, or to a client that does not ask for HTML, the root answers the text as before.
    request = urllib.request.Request(server.url + "/?prime=The&n=5&seed=1", headers={"Accept": "text/html"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        assert response.read().decode("utf-8") == get(server.url + "/?prime=The&n=5&seed=1")[2]
    assert get(server.url + "/")[1].get_content_type() == "text/plain"
    assert get(server.url + "/ui?x=1")[0] == 400


def test_settings_declares_every_parameter_with_this_servers_defaults_and_limits(server, flagged_server):
    status, headers, body = get(server.url + "/settings")
    assert status == 200 and headers.get_content_type() == "application/json"
    declared = {setting["name"]: setting for setting in json.loads(body)}
    assert list(declared) == ["prime", "n", "sample_mode", "temperature", "seed", "top_k", "top_p",
                              "frequency_penalty", "presence_penalty", "logprobs"]
    assert {name: setting["default"] for name, setting in declared.items()} == {
        "prime": "The ", "n": 200, "sample_mode": 2, "temperature": 0.8, "seed": None, "top_k": 0, "top_p": 1.0,
        **NO_PENALTIES, "logprobs": 0}
    assert (declared["frequency_penalty"]["low"], declared["presence_penalty"]["high"]) == (-2.0, 2.0)
    assert (declared["logprobs"]["low"], declared["logprobs"]["high"]) == (0, MAX_LOGPROBS)
    assert (declared["n"]["low"], declared["n"]["high"], declared["prime"]["high"]) == (1, 500, 1000)
    assert declared["sample_mode"]["choices"] == {"0": "argmax", "1": "sample", "2": "sample after spaces"}
    assert (declared["top_p"]["high"], declared["seed"]["high"]) == (1.0, MAX_SEED)
    assert all(setting["help"] and setting["flag"].startswith("-") for setting in declared.values())
    # The defaults are those a request without parameters gets.
    # (the answer's "logprobs" is the tokens' log-probabilities, null when none are asked)
    answer = json.loads(get(f"{server.url}/sample.json?seed=1")[2])
    assert answer["logprobs"] is None
    assert {name: answer[name] for name in declared if name not in ("seed", "logprobs")} == \
        {name: setting["default"] for name, setting in declared.items() if name not in ("seed", "logprobs")}
    flagged = {setting["name"]: setting for setting in json.loads(get(flagged_server.url + "/settings")[2])}
    assert (flagged["temperature"]["default"], flagged["n"]["high"], flagged["prime"]["high"]) == \
        (FLAGGED_TEMPERATURE, FLAGGED_MAX_N, FLAGGED_MAX_PRIME)
    assert get(server.url + "/settings?x=1")[0] == 400


def test_metrics_count_requests_by_endpoint_and_status(server):
    before = metric_samples(server.url)
    get(server.url + "/?n=abc")
    get(server.url + "/?prime=The&n=7")
    post_json(server.url + "/generate", b"{")
    get(server.url + "/nowhere/at/all")
    answered = [("/", "400"), ("/", "200"), ("/generate", "400"), ("other", "404")]

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    # A request is counted once its last byte is sent, which may be a moment after the client has read it.
    deadline = time.monotonic() + 10
    after = metric_samples(server.url)
    while time.monotonic() < deadline and not all(
            grew("char_rnn_requests_total", endpoint=endpoint, status=status) for endpoint, status in answered):
        time.sleep(0.05)
        after = metric_samples(server.url)

    assert grew("char_rnn_requests_total", endpoint="/", status="400") == 1
    assert grew("char_rnn_requests_total", endpoint="/", status="200") == 1
    assert grew("char_rnn_requests_total", endpoint="/generate", status="400") == 1
    assert grew("char_rnn_requests_total", endpoint="other", status="404") == 1
    assert grew("char_rnn_request_seconds_count", endpoint="/") == 2
    assert grew("char_rnn_tokens_generated_total") == 7
    assert after[("char_rnn_queue_depth", ())] == 0 and after[("char_rnn_generating", ())] == 0


@pytest.mark.parametrize("one_at_a_time", [["--max_batch", 1], ["--max_batch", 0, "--threads", 1]],
                         ids=["one_row", "no_batching"])
def test_flood_beyond_the_queue_gets_quick_503s_never_500(save_dir, tmp_path, one_at_a_time):
    flags = [*one_at_a_time, "--queue", 1, "--max_n", 20_000]
    with running_server(save_dir, str(tmp_path / "server.log"), *flags) as server:
        def client(index):  # GET / and POST /generate in turn
            start = time.monotonic()
            if index % 2:
                status, headers, answer = post_json(f"{server.url}/generate", {"prime": "The", "n": 20000, "seed": 1})
                return "POST", status, time.monotonic() - start, headers, answer
            status, headers, body = get(f"{server.url}/?prime=The&n=20000&seed=1")
            return "GET", status, time.monotonic() - start, headers, body

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            results = list(pool.map(client, range(48)))
        assert {status for _, status, *_ in results} == {200, 503}, [status for _, status, *_ in results]
        for protocol, status, _, headers, body in results:
            if status == 503 and protocol == "GET":
                assert_one_line_of_plain_text(headers, body)
                assert "busy" in body and headers["Retry-After"] == "1"
            elif status == 503:
                assert headers.get_content_type() == "application/json" and headers["Retry-After"] == "1"
                assert "busy" in body["error"]
        assert {protocol for protocol, status, *_ in results if status == 503} == {"GET", "POST"}
        # A refusal does not wait for a turn: it comes quicker than an answer.
        seconds = {code: statistics.median(s for _, status, s, *_ in results if status == code) for code in (200, 503)}
        assert seconds[503] < seconds[200]
        assert get(server.url + "/health")[0] == 200


# Two batching threads, each with 2 rows and 2 waiting places: bursts of exactly the 8 places.
BURST_FLAGS = ["--max_batch", 4, "--batchers", 2, "--queue", 4]
BURST_PLACES = 8
BURST_ROUNDS = 5
BURST_N = 300


def test_bursts_of_exactly_max_batch_plus_queue_streams_get_no_503_and_are_all_counted(save_dir, tmp_path):
    with running_server(save_dir, str(tmp_path / "server.log"), *BURST_FLAGS, "--production") as server:
        before = metric_samples(server.url)
        statuses = []
        for _ in range(BURST_ROUNDS):
            start = threading.Barrier(BURST_PLACES)

            def client(seed):
                start.wait()
                return stream(f"{server.url}/stream?prime=The&n={BURST_N}&seed={seed}")[0]

            with concurrent.futures.ThreadPoolExecutor(BURST_PLACES) as pool:
                statuses += pool.map(client, range(BURST_PLACES))
        assert statuses == [200] * (BURST_ROUNDS * BURST_PLACES)
        after = metric_samples(server.url)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    # A stream is counted before its last chunk is sent: every one is in the metrics once its client is done.
    assert grew("char_rnn_requests_total", endpoint="/stream", status="200") == len(statuses)
    assert grew("char_rnn_request_seconds_count", endpoint="/stream") == len(statuses)
    assert grew("char_rnn_tokens_generated_total") == len(statuses) * BURST_N


def test_a_stream_client_that_leaves_frees_its_row_and_sigterm_under_load_exits_in_seconds(save_dir, tmp_path):
    flags = ["--max_batch", 4, "--max_n", 100_000_000, "--shutdown_grace", 1, "--production"]
    with running_server(save_dir, str(tmp_path / "server.log"), *flags) as server:
        # A stream of hours at this model's speed: its client reads the first pieces, then hangs up.
        response = urllib.request.urlopen(f"{server.url}/stream?prime=The&n=100000000", timeout=REQUEST_TIMEOUT_S)
        events = read_events(response)
        assert [next(events)[0] for _ in range(3)] == ["text"] * 3
        assert metric_samples(server.url)[("char_rnn_generating", ())] == 1
        response.close()
        deadline = time.monotonic() + 20
        while metric_samples(server.url)[("char_rnn_generating", ())] != 0:
            assert time.monotonic() < deadline, "the row of the stream whose client left was not freed"
            time.sleep(0.1)
        tokens = metric_samples(server.url)[("char_rnn_tokens_generated_total", ())]
        time.sleep(0.5)
        assert metric_samples(server.url)[("char_rnn_tokens_generated_total", ())] == tokens  # nothing generates

        # Under load: 12 clients over GET, POST and the stream, two of them asking for hours of text.
        def client(index):
            protocol = ("GET", "POST", "stream")[index % 3]
            n = 100_000_000 if index < 2 else 300
            try:
                return request_over(protocol, server.url, SampleSettings("The", n, seed=index))[0]
            except (urllib.error.URLError, ConnectionError, AssertionError, http.client.HTTPException):
                return "cut"  # a stream's end event missing: cut by the shutdown

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            answers = [pool.submit(client, index) for index in range(12)]
            deadline = time.monotonic() + 60
            while not any(answer.done() for answer in answers[2:]):  # load: the short ones come and go
                assert time.monotonic() < deadline, "no short request was answered within 60 s"
                time.sleep(0.05)
            time.sleep(0.5)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(timeout=30)
            seconds = time.monotonic() - signalled
            statuses = [answer.result() for answer in answers]
    assert code == 0 and seconds < 6, (code, seconds)
    assert set(statuses) <= {200, 503, "cut"} and 200 in statuses, statuses
    assert "Traceback" not in server.log()


# ----------------------------------------------------------------------------------------------------------
# Start and stop


def test_missing_or_empty_save_dir_stops_the_server_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    # Both at once (each spends most of its time importing TensorFlow); one in the production environment, where
    # CherryPy logs nothing on screen, one in the development environment, where the engine's lines come first.
    cases = {missing: ["--production"], empty: []}
    processes = {}
    try:
        for save, flags in cases.items():
            processes[save] = subprocess.Popen([sys.executable, os.path.join(REPO, "sample_server.py"), "--save_dir",
                                                str(save), "--port", str(free_port()), *flags],
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for save, process in processes.items():
            err = process.communicate(timeout=START_TIMEOUT_S)[1]
            assert process.returncode == 1
            assert "Traceback" not in err
            lines = err.strip().splitlines()
            assert lines[-1].startswith("error: ") and str(save) in lines[-1], err
            if save == missing:
                assert len(lines) == 1, err
    finally:
        for process in processes.values():
            end_process(process)


def test_busy_port_or_an_address_not_here_stops_the_server_with_one_line(save_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_script("sample_server.py", "--save_dir", save_dir, "--port", port, timeout=START_TIMEOUT_S)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port or --host"]
    # 192.0.2.1 is a documentation address (RFC 5737), never this machine's: binding it fails at once.
    result = run_script("sample_server.py", "--save_dir", save_dir, "--host", "192.0.2.1", "--port", free_port(),
                        timeout=START_TIMEOUT_S)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 192.0.2.1:"), result.stderr


def test_listens_on_the_host_given_only(flagged_server):
    assert get(flagged_server.url + "/health")[0] == 200
    with pytest.raises(urllib.error.URLError) as refused:
        get(f"http://127.0.0.1:{flagged_server.port}/health")
    assert isinstance(refused.value.reason, ConnectionRefusedError)


def test_sigterm_during_a_request_exits_0_within_seconds(save_dir, tmp_path):
    with running_server(save_dir, str(tmp_path / "server.log"), "--max_batch", 1, "--max_n", 10_000_000) as server:
        # A request long enough (about two seconds here) to be in the middle of generating when SIGTERM comes.
        start = time.monotonic()
        assert get(f"{server.url}/?prime=The&n=100000&seed=1")[0] == 200
        n = min(10_000_000, int(100_000 * 2.0 / (time.monotonic() - start)))
        answers = {}

        def ask(name, n):
            status = get(f"{server.url}/?prime=The&n={n}&seed=1")[0]
            answers[name] = (status, time.monotonic())

        generating = threading.Thread(target=ask, args=("generating", n))
        waiting = threading.Thread(target=ask, args=("waiting", 5))  # --max_batch 1: it waits for a row
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


def test_ctrl_c_exits_0_cleanly_within_seconds(save_dir, tmp_path):
    with running_server(save_dir, str(tmp_path / "server.log"), "--production") as server:
        assert get(f"{server.url}/?prime=The&n=5")[0] == 200
        before = server.log()
        server.process.send_signal(signal.SIGINT)
        code = server.process.wait(timeout=30)
    assert code == 0, server.log()
    said = server.log()[len(before):]
    assert "Traceback" not in said and "interrupted" not in said and "KeyboardInterrupt" not in said
    assert len(said.strip().splitlines()) <= 1, said


def test_ctrl_c_or_sigterm_while_the_model_loads_exits_0_once_started(save_dir, tmp_path):
    # The development environment logs "Loading the model" as the engine starts: the signals come after it, while
    # the model loads and compiles (seconds), and take effect once the server has started.
    servers = {name: Server(save_dir, str(tmp_path / f"{name}.log")) for name in ("SIGINT", "SIGTERM")}
    try:
        for name, server in servers.items():
            deadline = time.monotonic() + START_TIMEOUT_S
            while "Loading the model" not in server.log():
                assert server.process.poll() is None and time.monotonic() < deadline, server.log()
                time.sleep(0.05)
            server.process.send_signal(getattr(signal, name))
        for name, server in servers.items():
            code = server.process.wait(timeout=START_TIMEOUT_S)
            assert code == 0, (name, server.log())
            assert "Traceback" not in server.log() and "interrupted" not in server.log(), (name, server.log())
    finally:
        for server in servers.values():
            server.stop()


@pytest.mark.parametrize("flags, reason", [
    (["--max_batch", "5000"], "--max_batch: '5000' is not an integer from 0 to 1024"),
    (["--max_batch", "-1"], "--max_batch: '-1' is not an integer from 0 to 1024"),
    (["--max_wait_ms", "-1"], "--max_wait_ms: '-1' is not a number of milliseconds >= 0"),
    (["--max_wait_ms", "nan"], "--max_wait_ms: 'nan'"),
    (["--port", "70000"], "--port: 70000 is not a port number"),
    (["--batchers", "-1"], "--batchers: '-1'"),
    (["--batchers", "two"], "--batchers: 'two'"),
    (["--batchers", "5", "--max_batch", "4"], "--batchers: 5 threads cannot share 4 rows (--max_batch); give at "
                                               "most 4"),
    (["--batchers", "1", "--max_batch", "0"], "--batchers: there are no batches with --max_batch 0"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, reason, capsys):
    import sample_server
    with pytest.raises(SystemExit) as exited:
        sample_server.main(flags)
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument " + reason.split(":")[0] in error and reason in error, error
