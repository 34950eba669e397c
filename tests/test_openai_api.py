"""The OpenAI-compatible API and the API keys: a request's fields mapped onto our settings (openai_api.py) and the key
files (api_keys.py) in this process, then a real sample_server.py with keys driven by the official `openai` client."""
import argparse
import json
import math
import urllib.parse
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import api_keys
import sample_server
from conftest import run_script
from openai_api import DEFAULT_MAX_TOKENS, MAX_CHOICES, APIError, default_model_name, parse_completion_request
from servers import REQUEST_TIMEOUT_S, get, post_json, running_server
from settings import MAX_SEED, MODE_ARGMAX, MODE_SAMPLE

MODEL = "tiny-lstm"  # the served model's --model_name
MAX_N = 300  # the server's --max_n
MAX_PRIME = 1000


def parsed(**fields):
    """A POST /v1/completions body with these fields (the model's name unless given) read as the server reads it."""
    return parse_completion_request(json.dumps({"model": MODEL, **fields}).encode(), MODEL, MAX_N, MAX_PRIME)


# ----------------------------------------------------------------------------------------------------------
# The request mapping, without a server


def test_openai_fields_map_onto_our_settings_with_openais_defaults():
    request = parsed(prompt="the ")
    assert (request.prompts, request.n, request.stops, request.stream, request.echo) == (("the ",), 1, (), False, False)
    settings = request.settings
    assert (settings.n, settings.mode, settings.temperature, settings.top_p) == (DEFAULT_MAX_TOKENS, MODE_SAMPLE, 1.0,
                                                                                   1.0)
    assert 0 <= settings.seed <= MAX_SEED  # picked once for the request, so that its choices are seed, seed + 1...
    request = parsed(prompt="the ", max_tokens=40, temperature=0.7, top_p=0.5, seed=9, stop="\n", echo=True)
    settings = request.settings
    assert (settings.n, settings.mode, settings.temperature, settings.top_p, settings.seed) == (40, MODE_SAMPLE, 0.7,
                                                                                                0.5, 9)
    assert request.stops == ("\n",) and request.echo
    assert parsed(prompt="the ", temperature=0).settings.mode == MODE_ARGMAX  # temperature 0 is argmax
    settings = parsed(prompt="the ", frequency_penalty=1.5, presence_penalty=-2, logprobs=5).settings
    assert (settings.frequency_penalty, settings.presence_penalty, settings.logprobs) == (1.5, -2.0, 5)
    settings = parsed(prompt="the ", logprobs=None).settings
    assert (settings.frequency_penalty, settings.presence_penalty, settings.logprobs) == (0.0, 0.0, 0)
    assert parsed(prompt="the ", stop=["a", "b"], seed=None, user="me").stops == ("a", "b")


def test_a_list_prompt_gives_n_choices_each_numbered_as_openai_does_with_seeds_from_the_requests():
    request = parsed(prompt=["the ", "a "], n=3, seed=MAX_SEED - 1)
    choices = request.choices()
    # Prompt i's j-th choice is choice i * n + j, and draws with seed + j (wrapping past the largest seed).
    assert [(choice.prime, choice.seed) for choice in choices] == [
        ("the ", MAX_SEED - 1), ("the ", MAX_SEED), ("the ", 0), ("a ", MAX_SEED - 1), ("a ", MAX_SEED), ("a ", 0)]
    assert {choice.n for choice in choices} == {DEFAULT_MAX_TOKENS}


@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": MAX_N + 1}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": MAX_CHOICES + 1}, "n"),
    ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": "x" * (MAX_PRIME + 1)}, "prompt"),
    ({"suffix": "the end"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"logit_bias": {"5": 100}}, "logit_bias"),
    ({"tools": []}, "tools"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": 2, "echo": True}, "echo"),  # the prompt's tokens are not scored
])
def test_a_refused_field_is_a_400_that_names_it(fields, param):
    with pytest.raises(APIError) as refused:
        parsed(**{"prompt": "the ", **fields})
    assert (refused.value.status, refused.value.param) == (400, param)
    assert param.split("_")[0] in refused.value.message and "\n" not in refused.value.message


def test_another_models_name_is_a_404_and_a_body_that_is_no_object_a_400():
    with pytest.raises(APIError) as refused:
        parsed(model="gpt-4", prompt="the ")
    assert (refused.value.status, refused.value.param, refused.value.code) == (404, "model", "model_not_found")
    for body in (b"[]", b"{", b'{"model": "a", "model": "b"}', b'{"n": NaN}'):
        with pytest.raises(APIError) as refused:
            parse_completion_request(body, MODEL, MAX_N, MAX_PRIME)
        assert refused.value.status == 400


def test_a_key_file_takes_one_key_a_line_without_blank_lines_or_comments_and_the_environment_adds_its_own(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# the team's keys\n\n  sk-one  \nsk-two\n")
    keys = api_keys.load_keys(str(key_file), {api_keys.KEYS_VARIABLE: "sk-three, sk-four sk-one"})
    assert keys == (b"sk-one", b"sk-two", b"sk-three", b"sk-four")
    assert api_keys.load_keys(None, {}) == ()
    assert api_keys.authorized("Bearer sk-two", keys) and api_keys.authorized("bearer sk-four", keys)
    for header in (None, "", "Bearer", "Bearer sk-on", "Bearer sk-one2", "Basic sk-one", "sk-one"):
        assert not api_keys.authorized(header, keys), header


@pytest.mark.parametrize("text, environment, reason", [
    (None, {api_keys.KEYS_VARIABLE: " , "}, "holds no key"),
    ("# only a comment\n\n", {}, "holds no key"),
    ("sk one\n", {}, "line 1"),
])
def test_a_key_file_or_variable_without_keys_is_refused_rather_than_serving_without_keys(tmp_path, text,
                                                                                         environment, reason):
    path = None
    if text is not None:
        path = tmp_path / "keys"
        path.write_text(text)
    with pytest.raises(ValueError, match=reason):
        api_keys.load_keys(path and str(path), environment)


def test_the_server_warns_when_it_listens_beyond_loopback_without_keys():
    assert "without API keys" in api_keys.open_warning("0.0.0.0", ())
    assert "without API keys" in api_keys.open_warning("example.org", ())
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert api_keys.open_warning(host, ()) is None, host
    assert api_keys.open_warning("0.0.0.0", (b"sk-one",)) is None


def test_the_model_name_is_the_save_dirs_own_name_unless_given():
    assert default_model_name("runs/shakespeare/") == "shakespeare"
    assert default_model_name("save/best") == "best"
    assert sample_server.model_name("my-model") == "my-model"
    for refused in ("", " ", "a/b"):
        with pytest.raises(argparse.ArgumentTypeError):
            sample_server.model_name(refused)


@pytest.mark.slow
def test_a_missing_or_empty_key_file_stops_the_server_at_start_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n# nothing\n")
    for path in (tmp_path / "missing", empty):
        result = run_script("sample_server.py", "--save_dir", tmp_path / "no-save", "--api_key_file", path)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --api_key_file"), result.stderr


# ----------------------------------------------------------------------------------------------------------
# A server with keys, through the openai client

KEY, ENVIRONMENT_KEY = "sk-file-key", "sk-environment-key"
AUTHORIZED = {"Authorization": f"Bearer {KEY}"}
PROMPT = "the "  # the conftest model knows lower-case text only


@pytest.fixture(scope="module")
def server(trained_save_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    key_file = root / "keys"
    key_file.write_text(f"# the tests' key\n\n{KEY}\n")
    with running_server(trained_save_dir, str(root / "server.log"), "--api_key_file", key_file,
                        "--model_name", MODEL, "--max_n", MAX_N,
                        env={api_keys.KEYS_VARIABLE: ENVIRONMENT_KEY}) as running:
        yield running


def client_of(server, key=KEY):
    # No retries: a refused request must raise at once.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def client(server):
    return client_of(server)


def native_text(server, **params):
    """GET /'s text (the prime and the generated text) for these query parameters."""
    status, _, body = get(f"{server.url}/?{urllib.parse.urlencode(params)}", headers=AUTHORIZED)
    assert status == 200, body
    return body


@pytest.mark.slow
def test_a_completion_with_a_seed_repeats_and_is_the_native_apis_text_for_the_same_settings(server, client):
    asked = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0.9, top_p=0.8, seed=5)
    answer = client.completions.create(**asked)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-") and answer.model == MODEL
    [choice] = answer.choices
    assert (choice.index, choice.finish_reason, choice.logprobs) == (0, "length", None)
    assert len(choice.text) == 40
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (4, 40, 44)
    assert client.completions.create(**asked).choices[0].text == choice.text
    assert PROMPT + choice.text == native_text(server, prime=PROMPT, n=40, sample_mode=1, temperature=0.9,
                                               top_p=0.8, seed=5)
    assert client.completions.create(**dict(asked, seed=6)).choices[0].text != choice.text
    # Temperature 0 is argmax, sample_mode 0.
    argmax = client.completions.create(**dict(asked, temperature=0, seed=None)).choices[0].text
    assert PROMPT + argmax == native_text(server, prime=PROMPT, n=40, sample_mode=0)


@pytest.mark.slow
def test_a_stream_sends_the_same_text_in_chunks_then_its_end_the_usage_and_done(server, client):
    asked = dict(model=MODEL, prompt=PROMPT, max_tokens=300, seed=3)
    whole = client.completions.create(**asked).choices[0].text
    chunks = list(client.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
    texts = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert len(texts) > 2 and "".join(texts) == whole  # the blocks of 128 tokens, then the end
    assert [chunk.choices[0].finish_reason for chunk in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 300
    # On the wire: data: lines of JSON, the last one data: [DONE].
    request = urllib.request.Request(f"{server.url}/v1/completions", method="POST",
                                     data=json.dumps(dict(asked, stream=True)).encode(),
                                     headers={**AUTHORIZED, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        assert response.headers.get_content_type() == "text/event-stream"
        lines = [line for line in response.read().decode().split("\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: {") for line in lines[:-1])


@pytest.mark.slow
def test_n_and_a_list_prompt_give_each_prompt_n_choices_numbered_as_openai_does(server, client):
    prompts, n = ["the ", "a "], 3
    answer = client.completions.create(model=MODEL, prompt=prompts, n=n, max_tokens=30, seed=11)
    assert [choice.index for choice in answer.choices] == list(range(len(prompts) * n))
    for choice in answer.choices:
        prompt, j = prompts[choice.index // n], choice.index % n
        assert prompt + choice.text == native_text(server, prime=prompt, n=30, sample_mode=1, temperature=1,
                                                   seed=11 + j)
    assert len({choice.text for choice in answer.choices}) == len(answer.choices)
    assert answer.usage.prompt_tokens == len("the ") + len("a ") and answer.usage.completion_tokens == 6 * 30


@pytest.mark.slow
def test_stop_ends_the_text_right_before_the_first_stop_string_and_echo_puts_the_prompt_first(client):
    asked = dict(model=MODEL, prompt=PROMPT, max_tokens=200, seed=2)
    whole = client.completions.create(**asked).choices[0].text
    stops = ["on", "\n"]
    cut = min(index for index in (whole.find(stop) for stop in stops) if index >= 0)
    stopped = client.completions.create(**asked, stop=stops)
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (whole[:cut], "stop")
    assert stopped.usage.completion_tokens == cut
    never = client.completions.create(**asked, stop="zz")  # a string the model never writes
    assert (never.choices[0].text, never.choices[0].finish_reason) == (whole, "length")
    echoed = client.completions.create(**asked, stop=stops, echo=True)
    assert echoed.choices[0].text == PROMPT + whole[:cut]


@pytest.mark.slow
@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": MAX_N + 1}, "max_tokens"),
    ({"prompt": "THE"}, "prompt"),  # characters the model does not know
    ({"suffix": "."}, "suffix"),
    ({"extra_body": {"logit_bias": {"3": 10}}}, "logit_bias"),
])
def test_a_bad_value_raises_bad_request_error_naming_the_parameter(client, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**{"model": MODEL, "prompt": PROMPT, **fields})
    assert refused.value.param == param and refused.value.type == "invalid_request_error"


@pytest.mark.slow
def test_the_model_is_listed_and_another_name_raises_not_found(client):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "char-rnn"
    with pytest.raises(openai.NotFoundError) as refused:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT)
    assert refused.value.code == "model_not_found" and refused.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("another")


def unauthorized_count(server):
    status, _, body = get(server.url + "/metrics", headers=AUTHORIZED)
    assert status == 200
    [family] = [family for family in text_string_to_metric_families(body)
                if family.name == "char_rnn_unauthorized_requests"]
    return next(sample.value for sample in family.samples if sample.name.endswith("_total"))


@pytest.mark.slow
def test_a_missing_or_wrong_key_is_refused_401_in_each_endpoints_format_and_counted(server):
    before = unauthorized_count(server)
    # No key (the client always has one: its header is left out), then a wrong one.
    for key, headers, reason in (("unsent", {"Authorization": openai.omit}, "needs an API key"),
                                 ("sk-wrong", None, "not valid")):
        with pytest.raises(openai.AuthenticationError) as refused:
            client_of(server, key).completions.create(model=MODEL, prompt=PROMPT, extra_headers=headers)
        assert refused.value.code == "invalid_api_key" and reason in refused.value.body["message"]
    # The key from the environment works as well as the file's.
    assert client_of(server, ENVIRONMENT_KEY).completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
    # The native endpoints: one line of plain text, or JSON from POST /generate; WWW-Authenticate names Bearer.
    status, headers, body = get(f"{server.url}/?prime=the")
    assert (status, headers["WWW-Authenticate"], headers.get_content_type()) == (401, "Bearer", "text/plain")
    assert body.count("\n") == 1 and "Authorization: Bearer" in body
    status, headers, answer = post_json(server.url + "/generate", {"prime": "the"},
                                        headers={"Authorization": "Bearer sk-wrong"})
    assert (status, headers["WWW-Authenticate"], answer) == (401, "Bearer", {"error": "the API key is not valid"})
    assert get(f"{server.url}/stream?prime=the")[0] == 401
    assert unauthorized_count(server) == before + 5
    # /health and the page itself need no key (the page asks for it); the rest answers with one.
    assert get(server.url + "/health")[0] == 200 and get(server.url + "/ui")[0] == 200
    status, _, answer = post_json(server.url + "/generate", {"prime": "the", "n": 5}, headers=AUTHORIZED)
    assert status == 200 and answer["text"].startswith("the")


@pytest.mark.slow
def test_logprobs_5_give_each_tokens_logprob_and_its_5_likeliest_alternatives_as_the_native_api_does(server, client):
    asked = dict(model=MODEL, prompt=PROMPT, max_tokens=150, seed=8, logprobs=5)
    [choice] = client.completions.create(**asked).choices
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.token_logprobs) == 150
    assert logprobs.text_offset == [len(PROMPT) + i for i in range(150)]  # in the prompt and text, as OpenAI's
    for token_logprob, alternatives in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert token_logprob <= 0 and len(alternatives) == 5
        values = list(alternatives.values())
        assert values == sorted(values, reverse=True) and sum(math.exp(value) for value in values) <= 1 + 1e-6
        assert token_logprob <= values[0] + 1e-6  # none likelier than the likeliest
    # The same numbers as the native JSON API's for the same settings.
    status, _, native = post_json(server.url + "/generate", {"prime": PROMPT, "n": 150, "sample_mode": 1,
                                                            "temperature": 1, "seed": 8, "logprobs": 5},
                                  headers=AUTHORIZED)
    assert status == 200 and native["text"] == PROMPT + choice.text
    assert native["logprobs"] == {"tokens": logprobs.tokens, "token_logprobs": logprobs.token_logprobs,
                                  "top_logprobs": logprobs.top_logprobs, "text_offset": logprobs.text_offset}
    # A stream carries each piece's tokens with it; without logprobs, none.
    chunks = [chunk.choices[0] for chunk in client.completions.create(**asked, stream=True) if chunk.choices]
    assert sum((chunk.logprobs.tokens for chunk in chunks if chunk.logprobs), []) == logprobs.tokens
    assert client.completions.create(**dict(asked, logprobs=None)).choices[0].logprobs is None


@pytest.mark.slow
def test_penalties_reach_the_generator_as_the_native_apis_do(server, client):
    asked = dict(model=MODEL, prompt=PROMPT, max_tokens=100, seed=4, temperature=0.8)
    plain = client.completions.create(**asked).choices[0].text
    for penalties in ({"frequency_penalty": 2.0}, {"presence_penalty": 1.5}, {"frequency_penalty": -1.0}):
        text = client.completions.create(**asked, **penalties).choices[0].text
        assert text != plain, penalties
        assert PROMPT + text == native_text(server, prime=PROMPT, n=100, sample_mode=1, temperature=0.8, seed=4,
                                            **penalties)
