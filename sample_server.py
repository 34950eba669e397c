"""Serve samples from a model trained by train.py over HTTP, with CherryPy.

usage: python sample_server.py [--port 8080] [--production] [--save_dir save] [--host 127.0.0.1]
       curl 'http://127.0.0.1:8080/?prime=The&n=200&sample_mode=2'

Endpoints: GET / (the text, as sample.py prints it; the web page to a browser that sends no parameters),
GET /sample.json (the text and the settings used, seed included), GET /stream (the text as Server-Sent Events while
it is generated), POST /generate (JSON in, JSON out), GET /ui (the web page), GET /settings (the sampling settings
with their defaults and limits, as JSON: the web page builds its form from it), GET /metrics (Prometheus),
GET /health ("ok" and the model served), POST /analyze (a text in, analyze.py's JSON out: each token's probability and
alternatives, the cells that track features), and OpenAI's completions API: POST /v1/completions and GET /v1/models
(openai_api.py). A bad request answers 400 with a one-line reason (JSON from /generate, OpenAI's error object from
/v1); a full queue answers 503 with Retry-After, and so does a generation that a shutdown stopped. With API keys
(--api_key_file, CHAR_RNN_API_KEYS; api_keys.py), every endpoint but /health and the page needs
"Authorization: Bearer KEY", and answers 401 without it.

Concurrent requests are generated together, as the rows of one batch (batching.py); --max_batch 0 generates each
request alone on its own thread instead (batching.OneAtATime). This module is the HTTP layer: the flags, the
endpoints and their one-line errors; the model's loading, the HTTP server's settings and the shutdown are in
server_engine.py, the parsing of a request in request_parsing.py.
"""
import argparse
import html
import json
import os
import re
import sys
import threading
import time
import urllib.parse

import cherrypy
from cherrypy.lib import httputil

import api_keys
import cli
import openai_api
from errors import Busy, GenerationStopped
from openai_api import APIError
from request_parsing import (
    Limits,
    TooLong,
    analyze_body_limit,
    parse_analyze_request,
    parse_json_request,
    parse_request,
    settings_json,
)
from runtime import warn
from server_engine import ModelPlugin, Shutdown, StartupFailed, check_port_free, server_config
from service_metrics import ServiceMetrics
from settings import MAX_ANALYZE, MAX_PRIME, SETTINGS, SETTINGS_BY_HTTP, SampleSettings
from token_logprobs import logprobs_json, pieces_json
from utils import tokenize
from value_types import number_type

DESCRIPTION = ("Serve text sampled from a trained char-rnn model over HTTP: "
               "GET /?prime=The&n=200&sample_mode=2 answers what sample.py prints for the same settings and seed.")
PLAIN_TEXT = "text/plain; charset=utf-8"
JSON_TYPE = "application/json"
EVENT_STREAM = "text/event-stream; charset=utf-8"
WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "ui.html")
ANALYSIS_SCRIPT = os.path.join(os.path.dirname(WEB_PAGE), "analysis.js")  # the page's Analyze view draws with it
MAX_PORT = 65535
RETRY_AFTER_S = "1"  # the Retry-After header of a 503
WWW_AUTHENTICATE = "Bearer"  # the WWW-Authenticate header of a 401: the scheme the key goes with
STOPPED_REASON = "the server is shutting down; the generation was stopped"  # a shutdown stopped a generation
MAX_BATCH = 1024  # the largest --max_batch (each row holds a worker thread)
MAX_SECONDS = 86400  # the longest --socket_timeout and --shutdown_grace (larger values overflow the clocks)

seconds = number_type(float, lambda v: 0 < v <= MAX_SECONDS, f"a number of seconds > 0 and <= {MAX_SECONDS}")
batch_rows = number_type(int, lambda v: 0 <= v <= MAX_BATCH, f"an integer from 0 to {MAX_BATCH}")
milliseconds = number_type(float, lambda v: 0 <= v <= 1000 * MAX_SECONDS, "a number of milliseconds >= 0")
seconds_or_zero = number_type(float, lambda v: 0 <= v <= MAX_SECONDS, f"a number of seconds from 0 to {MAX_SECONDS}")
# Paths that need no API key: the health check, and the page and its drawing script (a browser cannot send the key
# with a page or a script it loads; the page then asks for the key and sends it with each request).
OPEN_PATHS = ("/health", "/ui", "/analysis.js")


def model_name(text):
    """--model_name's type: a name that fits in a URL path (/v1/models/NAME), so neither empty nor with '/'."""
    if not text.strip() or "/" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a model name (not empty, no '/')")
    return text


def build_parser():
    """The original's flags (port, production, save_dir, word_level), plus host, sampling default and limits."""
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Where to listen and what to serve
    parser.add_argument("--port", type=cli.positive_int, default=8080, help="port the server listens on")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface, reachable from other machines)")
    parser.add_argument("--production", action="store_true",
                        help="use CherryPy's production environment (no engine or request log on screen)")
    cli.add_model_flags(parser)
    parser.add_argument("--model_name", type=model_name, default=None,
                        help="the model's name in the OpenAI-compatible API (/v1/models; requests must give it) "
                             "(default: the save dir's own name)")
    # Who may use it
    parser.add_argument("--api_key_file", default=None, metavar="PATH",
                        help=f"a file of API keys, one a line (# starts a comment); with keys (this file or "
                             f"{api_keys.KEYS_VARIABLE}), every endpoint but /health and the page needs "
                             f"'Authorization: Bearer KEY'")
    # Sampling
    parser.add_argument("--temperature", type=cli.positive_float,
                        default=SETTINGS_BY_HTTP["temperature"].served_default,
                        help="temperature of requests that give none (the original server's fixed value)")
    # Limits
    parser.add_argument("--max_n", type=cli.positive_int, default=2000,
                        help="largest n a request may ask for; above it the answer is 400")
    parser.add_argument("--max_prime", type=cli.positive_int, default=MAX_PRIME,
                        help="longest prime a request may give, in characters; above it the answer is 400")
    parser.add_argument("--max_analyze", type=cli.positive_int, default=MAX_ANALYZE,
                        help="longest text POST /analyze takes, in characters; above it the answer is 413 (the "
                             "analysis runs on the request's thread, beside the batches)")
    parser.add_argument("--max_batch", type=batch_rows, default=32,
                        help="requests generated together as the rows of one batch; one that arrives while a batch "
                             "runs joins it at the next block (of at most 128 tokens; 0: no batching, each request "
                             "generates alone on its own thread, --threads at once)")
    parser.add_argument("--batchers", type=cli.non_negative_int, default=0,
                        help="threads that run batches, each with its share of the --max_batch rows; a request "
                             "goes to the least loaded (0: one per CPU core, each with 16 rows or more)")
    parser.add_argument("--max_wait_ms", type=milliseconds, default=2.0,
                        help="how long an idle server waits for more requests to start a batch with (not after a "
                             "batch that only ever had one row: a lone client's requests start at once)")
    parser.add_argument("--threads", type=cli.positive_int, default=4,
                        help="with --max_batch 0: requests generating text at once, each on its own thread")
    parser.add_argument("--queue", type=cli.non_negative_int, default=32,
                        help="requests that may wait for a row of the batch (or a thread); beyond them the answer "
                             "is 503 at once")
    parser.add_argument("--socket_timeout", type=seconds, default=2.0,
                        help="seconds a connection may stay silent while sending its request (or not read the "
                             "answer) before it is dropped; generating takes as long as it takes")
    parser.add_argument("--shutdown_grace", type=seconds_or_zero, default=5.0,
                        help="on SIGTERM, SIGHUP or Ctrl-C, seconds a generation in progress may still run to "
                             "finish; then it stops and its request is answered 503")
    return parser


# ----------------------------------------------------------------------------------------------------------
# The endpoints


class SampleService:
    """The endpoints: GET / (text/plain, or the web page), /sample.json, /stream, /ui, /settings, /metrics, /health,
    /analysis.js, and POST /generate and /analyze."""

    def __init__(self, model, limits, metrics, max_analyze=MAX_ANALYZE):
        self.model, self.limits, self.measured = model, limits, metrics
        self.max_analyze, self.analysis, self.analyzer_lock = max_analyze, None, threading.Lock()

    @cherrypy.expose
    def index(self, **params):
        """The prime followed by the generated text, exactly as sample.py prints it (without its final newline);
        a browser that asks for HTML and gives no parameters gets the web page."""
        if not params and wants_html():
            return self.ui()
        request, text, _ = self.sample(params)
        cherrypy.response.headers["Content-Type"] = PLAIN_TEXT
        cherrypy.response.headers["X-Seed"] = str(request.seed)
        return text.encode("utf-8")

    @cherrypy.expose
    @cherrypy.tools.json_out()
    def sample_json(self, **params):
        """{"text": ..., and every setting used, "seed" included, "logprobs" (see answer_json)}; CherryPy maps
        /sample.json to this name."""
        return answer_json(*self.sample(params))

    @cherrypy.expose
    def generate(self):
        """POST /generate: a JSON object of settings in, {"text": ..., the settings used, "logprobs", "tokens"}
        out."""
        cherrypy.response.headers["Content-Type"] = JSON_TYPE
        body = read_body(self.limits.max_body)
        try:
            request = parse_json_request(body, self.limits)
        except ValueError as error:
            raise cherrypy.HTTPError(400, str(error))
        return json.dumps({**answer_json(*self.sample(request)), "tokens": request.n}).encode("utf-8")

    @cherrypy.expose
    def analyze(self):
        """POST /analyze: {"text", "top", "cells", "layer"} in, analyze.py's JSON out (without source and
        checkpoint). Runs on the request's thread, so a long text never holds up the batches' blocks; --max_analyze
        bounds it."""
        cherrypy.response.headers["Content-Type"] = JSON_TYPE
        body = read_body(analyze_body_limit(self.max_analyze))
        try:
            data = self.analyzed(parse_analyze_request(body, self.max_analyze))
        except TooLong as error:
            raise cherrypy.HTTPError(413, str(error))
        except ValueError as error:
            raise cherrypy.HTTPError(400, str(error))
        return json.dumps(data).encode("utf-8")

    def analyzed(self, request):
        """The analysis of a parsed POST /analyze request by the served model, whose Analyzer (it keeps its
        compiled passes) is made at the first one. ValueError for a text or a layer the model refuses."""
        import analysis  # TensorFlow: after the model plugin has imported it quietly
        from utils import normalize_newlines
        sampler = self.model.sampler
        with self.analyzer_lock:
            if self.analysis is None:
                self.analysis = analysis.Analyzer(sampler.generator.model)
        text = normalize_newlines(request["text"], sampler.keep_crlf)  # as training read its text
        return analysis.analyze_text(self.analysis, text, sampler.vocab, sampler.unk_token, sampler.word_level,
                                     request["top"], request["cells"], request["layer"])

    @cherrypy.expose
    def analysis_js(self, **params):
        """GET /analysis.js: the Analyze view's renderer (the one analyze.py's reports inline)."""
        return static_file("/analysis.js", params, ANALYSIS_SCRIPT, "text/javascript")

    @cherrypy.expose
    def stream(self, **params):
        """GET /stream: the same parameters as GET /; Server-Sent Events as the text is generated: "text" events
        ({"text": piece}, the prime first; with logprobs > 0 also "tokens": the tokens that begin in the piece, as
        token_logprobs.pieces_json), then "done" (the settings used, seed included, and "tokens"), or
        "error" ({"error": reason}) when a shutdown stops it. A client that leaves frees its row at the next
        block."""
        request = self.parsed(params)
        generation = self.submit(request)
        headers = cherrypy.response.headers
        headers["Content-Type"] = EVENT_STREAM
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"  # a proxy in front should pass each event on at once
        return self.events(request, generation)
    stream._cp_config = {"response.stream": True}

    def events(self, request, generation):
        try:
            for piece, details in generation.pieces():
                yield server_sent_event("text", {"text": piece, "tokens": pieces_json(details)} if request.logprobs
                                        else {"text": piece})
            yield server_sent_event("done", {**settings_json(request), "tokens": request.n})
        except GenerationStopped:
            yield server_sent_event("error", {"error": STOPPED_REASON})
        finally:
            generation.close()

    @cherrypy.expose
    def ui(self, **params):
        """The web page: one static HTML file with its script and styles."""
        return static_file("/ui", params, WEB_PAGE, "text/html")

    @cherrypy.expose
    def settings(self, **params):
        """GET /settings: the sampling settings as settings.SETTINGS declares them, with this server's defaults and
        limits (Limits.describe), as a JSON list; the web page builds its form from it."""
        if params:
            raise cherrypy.HTTPError(400, "/settings takes no parameters")
        cherrypy.response.headers["Content-Type"] = JSON_TYPE
        return json.dumps([self.limits.describe(setting) for setting in SETTINGS]).encode("utf-8")

    @cherrypy.expose
    def metrics(self, **params):
        """Prometheus' text format: requests by endpoint and status, latency, queue depth, batch size, tokens."""
        if params:
            raise cherrypy.HTTPError(400, "/metrics takes no parameters")
        content_type, body = self.measured.exposition()
        cherrypy.response.headers["Content-Type"] = content_type
        return body

    @cherrypy.expose
    def health(self, **params):
        """"ok" and which model is served; the server listens only once the model is loaded."""
        if params:
            raise cherrypy.HTTPError(400, "/health takes no parameters")
        cherrypy.response.headers["Content-Type"] = PLAIN_TEXT
        return f"ok: {self.model.description}\n".encode("utf-8")

    def sample(self, params):
        """Check the parameters (a dict of query parameters, or SampleSettings already read), wait for a row,
        generate; returns (SampleSettings, text, [TokenLogprob], empty unless logprobs were asked)."""
        request = params if isinstance(params, SampleSettings) else self.parsed(params)
        generation = self.submit(request)
        text, details = [], []
        try:
            for piece, found in generation.pieces():
                text.append(piece)
                details += found
        except GenerationStopped:
            raise cherrypy.HTTPError(503, STOPPED_REASON) from None
        finally:
            generation.close()
        return request, "".join(text), details

    def parsed(self, params):
        """Query parameters -> SampleSettings, or 400."""
        try:
            return parse_request(params, self.limits)
        except ValueError as error:
            raise cherrypy.HTTPError(400, str(error))

    def submit(self, request):
        """Hand the request to the generation: its Generation, or 400 (a bad prime) or 503 (full, shutting down)."""
        try:
            return self.model.generation.submit(request)
        except ValueError as error:
            raise cherrypy.HTTPError(400, str(error))
        except Busy as error:
            raise cherrypy.HTTPError(503, str(error))
        except GenerationStopped:
            raise cherrypy.HTTPError(503, "the server is shutting down") from None


class OpenAIService:
    """POST /v1/completions and GET /v1/models: OpenAI's (legacy) completions API over the same generation as the
    native endpoints (openai_api.py reads the requests and writes the answers). Errors are OpenAI's error object."""

    def __init__(self, model, limits, name):
        self.model, self.limits, self.name = model, limits, name
        self.created = int(time.time())  # the model's "created" in /v1/models: when the server started

    @cherrypy.expose
    def completions(self, **params):
        """POST /v1/completions: a completion object, or with "stream": true its chunks as Server-Sent Events
        (data: lines) ending with data: [DONE]."""
        cherrypy.response.headers["Content-Type"] = JSON_TYPE
        body = read_body(self.limits.max_body * openai_api.MAX_CHOICES)
        try:
            if params:
                raise APIError(400, "/v1/completions takes its fields in the JSON body, not the query string")
            request = openai_api.parse_completion_request(body, self.name, self.limits.max_n, self.limits.max_prime)
            generations = self.submit(request)
        except APIError as error:
            return refuse(error)
        answer = openai_api.completion_id(), int(time.time())
        if request.stream:
            headers = cherrypy.response.headers
            headers["Content-Type"] = EVENT_STREAM
            headers["Cache-Control"] = "no-cache"
            headers["X-Accel-Buffering"] = "no"
            cherrypy.response.stream = True
            return self.chunks(request, generations, *answer)
        try:
            choices = [self.choice(generation, index, request.echo) for index, generation in enumerate(generations)]
        except GenerationStopped:
            return refuse(APIError(503, STOPPED_REASON))
        finally:
            for generation in generations:
                generation.close()
        return json.dumps(openai_api.completion(*answer, self.name, choices, self.prompt_tokens(request))).encode()

    def submit(self, request):
        """Each choice's Generation, in OpenAI's order; APIError when one is refused (the others are closed)."""
        generations = []
        try:
            for settings in request.choices():
                generations.append(self.model.generation.submit(settings, request.stops))
        except (ValueError, Busy, GenerationStopped) as error:
            for generation in generations:
                generation.close()
            if isinstance(error, ValueError):  # the settings are checked: a prime with unknown tokens
                raise APIError(400, str(error), param="prompt") from None
            raise APIError(503, str(error) if isinstance(error, Busy) else "the server is shutting down") from None
        return generations

    def choice(self, generation, index, echo):
        """A choice's answer (openai_api.Choice), once its generation is over."""
        pieces = generation.pieces()
        prime, _ = next(pieces)
        text, details = [], []
        for piece, found in pieces:
            text.append(piece)
            details += found
        text = "".join(text)
        return openai_api.Choice(prime + text if echo else text, index, *self.ending(generation, text),
                                 details if generation.settings.logprobs else None)

    def ending(self, generation, text):
        """(finish_reason, tokens generated) of a generation that is over, whose generated text is `text`: "stop"
        and the tokens of the text kept when a stop string ended it, "length" and its n otherwise."""
        if generation.stopped:
            return "stop", len(tokenize(text, self.model.sampler.word_level))
        return "length", generation.settings.n

    def chunks(self, request, generations, answer_id, created):
        """The stream: each choice's pieces as they come (the prompt first with echo), then its end; the usage
        with stream_options.include_usage; then [DONE]. A shutdown that stops it sends OpenAI's error object."""
        def sent(index, text, finish_reason=None, details=None):
            return openai_api.server_sent(openai_api.chunk(answer_id, created, self.name, index, text, finish_reason,
                                                           details if request.settings.logprobs else None))
        made = 0
        try:
            for index, generation in enumerate(generations):
                pieces, generated = generation.pieces(), []
                prime, _ = next(pieces)
                if request.echo and prime:
                    yield sent(index, prime)
                for piece, details in pieces:
                    if piece or details:
                        generated.append(piece)
                        yield sent(index, piece, details=details)
                finish_reason, tokens = self.ending(generation, "".join(generated))
                made += tokens
                yield sent(index, "", finish_reason)
            if request.include_usage:
                yield openai_api.server_sent(openai_api.usage_chunk(answer_id, created, self.name,
                                                                    self.prompt_tokens(request), made))
            yield openai_api.DONE_EVENT
        except GenerationStopped:
            yield openai_api.server_sent(json.loads(openai_api.error_body(503, STOPPED_REASON)))
        finally:
            for generation in generations:
                generation.close()

    def prompt_tokens(self, request):
        """The prompts' tokens, each prompt counted once."""
        return sum(len(tokenize(prompt, self.model.sampler.word_level)) for prompt in request.prompts)

    @cherrypy.expose
    def models(self, *names, **params):
        """GET /v1/models: the model served, in OpenAI's list; GET /v1/models/NAME: that model, or 404."""
        cherrypy.response.headers["Content-Type"] = JSON_TYPE
        if params:
            return refuse(APIError(400, "/v1/models takes no parameters"))
        if not names:
            return json.dumps(openai_api.model_list(self.name, self.created)).encode("utf-8")
        if names != (self.name,):
            return refuse(APIError(404, f"the model {'/'.join(names)!r} does not exist; this server serves "
                                        f"{self.name!r}", param="model", code="model_not_found"))
        return json.dumps(openai_api.model_object(self.name, self.created)).encode("utf-8")


def refuse(error):
    """Answer an openai_api.APIError: its status and OpenAI's error object (Retry-After with a 503)."""
    response = cherrypy.serving.response
    response.status = error.status
    response.headers["Content-Type"] = JSON_TYPE
    if error.status == 503:
        response.headers["Retry-After"] = RETRY_AFTER_S
    return error.body()
def answer_json(request, text, details):
    """The JSON answer of a sample: {"text", every setting used (seed included), "logprobs": the tokens' log-
    probabilities as token_logprobs.logprobs_json writes them, or null when none were asked}."""
    return {"text": text, **settings_json(request),
            "logprobs": logprobs_json(details) if request.logprobs else None}


def static_file(path, params, file_path, content_type):
    """The bytes of one of the page's files, as `content_type` in UTF-8; a request with parameters answers 400."""
    if params:
        raise cherrypy.HTTPError(400, f"{path} takes no parameters")
    cherrypy.response.headers["Content-Type"] = f"{content_type}; charset=utf-8"
    with open(file_path, "rb") as file:
        return file.read()


def server_sent_event(name, data):
    """One Server-Sent Event: its name and one line of JSON data."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode("utf-8")


def wants_html():
    """Whether the client is a browser asking for a page (its Accept header names text/html)."""
    return "text/html" in cherrypy.serving.request.headers.get("Accept", "")


def read_body(limit):
    """The request body (bytes), at most `limit` bytes, 413 beyond, 408 when it stops arriving, 400 when its chunks
    are malformed; read whatever its Content-Type says (curl -d sends JSON as a form), so that anything but JSON is
    refused by the JSON parser with its reason."""
    request = cherrypy.serving.request
    length = request.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > limit:
        raise cherrypy.HTTPError(413, f"the body is {int(length)} bytes; the limit is {limit}")
    try:
        body = request.body.fp.read(limit + 1) if request.body.fp is not None else b""
    except TimeoutError:  # the client went silent before the end of its body (Content-Length, or chunks)
        # A socket that timed out cannot be read again: the connection is closed after this answer.
        cherrypy.serving.response.headers["Connection"] = "close"
        raise cherrypy.HTTPError(408, f"the body stopped arriving before its end (nothing for "
                                      f"{cherrypy.server.socket_timeout:g} s, --socket_timeout)") from None
    except ValueError as error:  # cheroot's reader of a chunked body that breaks the chunked format
        # The rest of the connection would be read as the next request: it is closed after this answer.
        cherrypy.serving.response.headers["Connection"] = "close"
        raise cherrypy.HTTPError(400, f"the chunked body is malformed ({error})") from None
    if len(body) > limit:
        raise cherrypy.HTTPError(413, f"the body is more than {limit} bytes")
    return body


# ----------------------------------------------------------------------------------------------------------
# Plain-text errors: one line, no traceback, no HTML

_BROKEN_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def check_query_string():
    """Refuse a malformed query string with 400 (CherryPy would keep '%zz' as text and answer 404 for bytes that
    are not UTF-8)."""
    query = cherrypy.serving.request.query_string
    if not query.isascii():
        raise cherrypy.HTTPError(400, "the query string has characters that are not percent-encoded")
    if _BROKEN_ESCAPE.search(query):
        raise cherrypy.HTTPError(400, "the query string has a broken percent-escape (a % without two hex digits)")
    try:
        for field in re.split("[&;]", query):
            urllib.parse.unquote_plus(field, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise cherrypy.HTTPError(400, "the query string is not UTF-8 once percent-decoded") from None


def error_headers(status, content_type):
    """The headers of an error page: its Content-Type, Retry-After with a 503, WWW-Authenticate with a 401."""
    headers = cherrypy.serving.response.headers
    headers["Content-Type"] = content_type
    if status.startswith("503"):
        headers["Retry-After"] = RETRY_AFTER_S
    if status.startswith("401"):
        headers["WWW-Authenticate"] = WWW_AUTHENTICATE


def one_line(message):
    """An error page's message as one line (CherryPy hands it over HTML-escaped)."""
    return " ".join(html.unescape(message).splitlines())


def plain_error_page(status, message, traceback, version):
    """error_page.default: the reason on one line of plain text (the traceback, if any, stays in the log)."""
    error_headers(status, PLAIN_TEXT)
    return one_line(message) + "\n"


def trim_error_padding():
    """CherryPy pads short error bodies with spaces to 513 bytes (for Internet Explorer 5's "friendly" error
    pages); a plain-text answer is its one line."""
    response = cherrypy.serving.response
    if response.status is not None and httputil.valid_status(response.status)[0] >= 400:
        body = response.collapse_body().rstrip(b" ")
        response.body = body
        response.headers["Content-Length"] = str(len(body))


def json_error_page(status, message, traceback, version):
    """error_page.default of POST /generate: {"error": the one-line reason}."""
    error_headers(status, JSON_TYPE)
    return json.dumps({"error": one_line(message)})


def openai_error_page(status, message, traceback, version):
    """error_page.default of the /v1 paths: OpenAI's error object."""
    error_headers(status, JSON_TYPE)
    return openai_api.error_body(int(status.split()[0]), one_line(message))


def check_api_key(keys, metrics):
    """on_start_resource, with API keys: a request without `Authorization: Bearer KEY` naming one of them answers
    401 (in its endpoint's error format) and is counted; /health and the page need no key."""
    request = cherrypy.serving.request
    if request.path_info in OPEN_PATHS or (request.path_info == "/" and not request.query_string and wants_html()):
        return
    header = request.headers.get("Authorization")
    if api_keys.authorized(header, keys):
        return
    metrics.unauthorized.inc()
    raise cherrypy.HTTPError(401, "the API key is not valid" if header else
                                  "this server needs an API key: send the header Authorization: Bearer KEY")


def mark_arrival():
    """Note when the request arrived (for the latency metric)."""
    cherrypy.serving.request.arrived = time.perf_counter()


def count_request(metrics):
    """on_end_request (after the last byte, a stream's included): count the request and its latency."""
    request, response = cherrypy.serving.request, cherrypy.serving.response
    status = httputil.valid_status(response.status)[0] if response.status else 500
    metrics.observe_request(request.path_info, status, getattr(request, "arrived", time.perf_counter()))


def internal_error():
    """request.error_response: an unexpected exception answers 500 with one line (its traceback is logged)."""
    cherrypy.HTTPError(500, "internal error; the server log has the details").set_response()
    trim_error_padding()


cherrypy.tools.check_api_key = cherrypy.Tool("on_start_resource", check_api_key, priority=20)
cherrypy.tools.check_query_string = cherrypy.Tool("on_start_resource", check_query_string)
cherrypy.tools.trim_error_padding = cherrypy.Tool("before_finalize", trim_error_padding)
cherrypy.tools.mark_arrival = cherrypy.Tool("on_start_resource", mark_arrival, priority=1)
cherrypy.tools.count_request = cherrypy.Tool("on_end_request", count_request)


# ----------------------------------------------------------------------------------------------------------
# Configuration and start


def app_config(metrics, keys=()):
    """The application's settings, for tree.mount: GET and HEAD only (POST for /generate, /analyze and
    /v1/completions), every
    error one line of plain text (JSON from /generate, OpenAI's error object from /v1), every request counted in
    the metrics, and with `keys` (bytes) every request but /health's and the page's asked for one of them."""
    return {
        "/": {
            "tools.check_api_key.on": bool(keys),
            "tools.check_api_key.keys": keys,
            "tools.check_api_key.metrics": metrics,
            "tools.allow.on": True,
            "tools.allow.methods": ["GET", "HEAD"],
            "tools.check_query_string.on": True,
            "tools.trim_error_padding.on": True,
            "tools.mark_arrival.on": True,
            "tools.count_request.on": True,
            "tools.count_request.metrics": metrics,
            "tools.encode.on": False,  # the handlers answer UTF-8 bytes with their own Content-Type
            "request.show_tracebacks": False,
            "request.show_mismatched_params": False,
            "request.error_response": internal_error,
            "error_page.default": plain_error_page,
        },
        "/stream": {
            "tools.allow.methods": ["GET"],  # a HEAD would never read the stream that holds its place
        },
        "/generate": {
            "tools.allow.methods": ["POST"],
            "request.process_request_body": False,  # read_body reads it
            "error_page.default": json_error_page,
        },
        "/analyze": {
            "tools.allow.methods": ["POST"],
            "request.process_request_body": False,
            "error_page.default": json_error_page,
        },
        "/v1": {
            "error_page.default": openai_error_page,
        },
        "/v1/completions": {
            "tools.allow.methods": ["POST"],
            "request.process_request_body": False,
        },
    }


def serve(args):
    """Load the model, serve until SIGTERM or Ctrl-C; returns 0."""
    keys = api_keys.load_keys(args.api_key_file, os.environ)  # a bad key file fails at once, before the slow start
    check_port_free(args.host, args.port)  # before the slow start, so that a busy port fails at once
    warning = api_keys.open_warning(args.host, keys)
    if warning:
        warn(warning)
    cli.quiet_tensorflow()  # the model plugin imports sampler, and with it TensorFlow
    engine = cherrypy.engine
    metrics = ServiceMetrics()
    model = ModelPlugin(engine, args, metrics)
    model.subscribe()
    # cheroot takes a socket timeout in fractions of a second; CherryPy's checker expects an int, the type of its
    # default (10), and would warn at every start.
    cherrypy.checker.known_config_types["server.socket_timeout"] = float
    cherrypy.config.update(server_config(args))
    limits = Limits(args.max_n, args.max_prime, args.temperature)
    service = SampleService(model, limits, metrics, args.max_analyze)
    name = args.model_name or openai_api.default_model_name(args.save_dir)
    service.v1 = OpenAIService(model, limits, name)
    cherrypy.tree.mount(service, "/", app_config(metrics, keys))
    engine.log(f"OpenAI-compatible API at /v1, model {name!r}; "
               f"{f'{len(keys)} API keys' if keys else 'no API keys'}")
    shutdown = Shutdown(engine)
    shutdown.subscribe()
    try:
        engine.start()
    except StartupFailed as failure:
        cherrypy.log.screen = False  # the engine's shutdown lines would bury the one line that matters
        engine.stop()  # from "starting" to "stopped", so that exit() does not end the process with code 70
        engine.exit()
        raise failure.error from None
    if shutdown.requested:
        engine.exit()
    engine.block()
    return 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.port > MAX_PORT:
        parser.error(f"argument --port: {args.port} is not a port number (1 to {MAX_PORT})")
    if args.batchers and not args.max_batch:
        parser.error("argument --batchers: there are no batches with --max_batch 0; leave --batchers out")
    if args.batchers > args.max_batch:
        parser.error(f"argument --batchers: {args.batchers} threads cannot share {args.max_batch} rows "
                     f"(--max_batch); give at most {args.max_batch}")
    return cli.run(lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
