"""Serve samples from a model trained by train.py over HTTP, with CherryPy.

usage: python sample_server.py [--port 8080] [--production] [--save_dir save] [--host 127.0.0.1]
       curl 'http://127.0.0.1:8080/?prime=The&n=200&sample_mode=2'

Endpoints: GET / (the text, as sample.py prints it), GET /sample.json (the text and the settings used, seed
included), GET /health ("ok" and the model served). A bad request answers 400 with a one-line plain-text reason;
a full queue answers 503, and so does a generation that a shutdown stopped.
"""
import argparse
import contextlib
import dataclasses
import html
import re
import secrets
import signal
import socket
import sys
import threading
import urllib.parse

import cherrypy
from cherrypy.lib import httputil
from cherrypy.process.plugins import SimplePlugin
from cherrypy.process.wspbus import states

import cli
from settings import MODE_SAMPLE_ON_SPACES, SAMPLE_MODES, SampleSettings

DESCRIPTION = ("Serve text sampled from a trained char-rnn model over HTTP: "
               "GET /?prime=The&n=200&sample_mode=2 answers what sample.py prints for the same settings and seed.")
PLAIN_TEXT = "text/plain; charset=utf-8"
MAX_PORT = 65535
# Worker threads beyond --threads + --queue: with every slot taken, these still answer 503 and /health at once.
SPARE_WORKERS = 4
LISTEN_BACKLOG = 128  # connections the kernel holds before CherryPy accepts them (CherryPy's default is 5)
SLOT_POLL_S = 0.1  # how often a waiting request checks whether the server is shutting down
RETRY_AFTER_S = "1"  # the Retry-After header of a 503
# A seed the server picks for a request without one: any seed works, a short one is easy to send back.
AUTO_SEED_LIMIT = 2 ** 31
MAX_DIGITS = 20  # longer numbers are refused before int() spends time on them
SHOWN_VALUE_CHARS = 40  # a refused value is quoted in the reason up to this length
MAX_SECONDS = 86400  # the longest --socket_timeout and --shutdown_grace (larger values overflow the clocks)

# Query parameters of GET / and GET /sample.json, and the original server's defaults.
PARAMETERS = ("prime", "n", "sample_mode", "temperature", "seed", "top_k", "top_p")
DEFAULT_PRIME = "The "
DEFAULT_N = 200
DEFAULT_SAMPLE_MODE = MODE_SAMPLE_ON_SPACES


seconds = cli._number(float, lambda v: 0 < v <= MAX_SECONDS, f"a number of seconds > 0 and <= {MAX_SECONDS}")
seconds_or_zero = cli._number(float, lambda v: 0 <= v <= MAX_SECONDS, f"a number of seconds from 0 to {MAX_SECONDS}")


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
    # Sampling
    parser.add_argument("--temperature", type=cli.positive_float, default=0.8,
                        help="temperature of requests that give none (the original server's fixed value)")
    # Limits
    parser.add_argument("--max_n", type=cli.positive_int, default=2000,
                        help="largest n a request may ask for; above it the answer is 400")
    parser.add_argument("--max_prime", type=cli.positive_int, default=1000,
                        help="longest prime a request may give, in characters; above it the answer is 400")
    parser.add_argument("--threads", type=cli.positive_int, default=4,
                        help="requests generating text at once (each on a CherryPy worker thread)")
    parser.add_argument("--queue", type=cli.non_negative_int, default=32,
                        help="requests that may wait for a generating thread; beyond them the answer is 503 at once")
    parser.add_argument("--socket_timeout", type=seconds, default=2.0,
                        help="seconds a connection may stay silent while sending its request (or not read the "
                             "answer) before it is dropped; generating takes as long as it takes")
    parser.add_argument("--shutdown_grace", type=seconds_or_zero, default=5.0,
                        help="on SIGTERM, SIGHUP or Ctrl-C, seconds a generation in progress may still run to "
                             "finish; then it stops and its request is answered 503")
    return parser


# ----------------------------------------------------------------------------------------------------------
# Request parameters: strings in, checked values out


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the flags allow a request: the largest n, the longest prime, the default temperature."""
    max_n: int
    max_prime: int
    temperature: float


def parse_request(params, limits):
    """Query parameters (CherryPy gives a str, or a list when repeated) -> SampleSettings.

    Raises ValueError with a one-line reason for an unknown or repeated parameter or a bad value.
    """
    unknown = [name for name in params if name not in PARAMETERS]
    if unknown:
        raise ValueError(f"unknown parameter {shown(unknown[0])}; the parameters are {', '.join(PARAMETERS)}")
    for name, value in params.items():
        if isinstance(value, list):
            raise ValueError(f"parameter {name} is given {len(value)} times; give it once")
    prime = params.get("prime", DEFAULT_PRIME)
    if len(prime) > limits.max_prime:
        raise ValueError(f"prime is {len(prime)} characters long; the limit is {limits.max_prime} (--max_prime)")
    seed = integer(params, "seed", None, 0, None)
    return SampleSettings(
        prime=prime,
        n=integer(params, "n", min(DEFAULT_N, limits.max_n), 1, limits.max_n, "--max_n"),  # never above --max_n
        mode=sample_mode(params),
        temperature=number(params, "temperature", limits.temperature, cli.positive_float,
                           "a finite number > 0 (1.2e-38 to 3.4e+38)"),
        # Without a seed the server picks one, so that the answer says which seed repeats it.
        seed=secrets.randbelow(AUTO_SEED_LIMIT) if seed is None else seed,
        top_k=integer(params, "top_k", 0, 0, None),
        top_p=number(params, "top_p", SampleSettings.top_p, cli.top_p, "a number in (0, 1]"))


_DIGITS = re.compile(r"[0-9]{1,%d}" % MAX_DIGITS)


def integer(params, name, default, low, high, flag=None):
    """params[name] as an int in [low, high], or default when absent. high None: the sampler checks the top."""
    text = params.get(name)
    if text is None:
        return default
    if _DIGITS.fullmatch(text) and low <= int(text) and (high is None or int(text) <= high):
        return int(text)
    bound = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
    raise ValueError(f"{name} must be {bound}{f' ({flag})' if flag else ''}, got {shown(text)}")


def sample_mode(params):
    """params["sample_mode"] as one of SAMPLE_MODES, or the default when absent."""
    text = params.get("sample_mode")
    if text is None:
        return DEFAULT_SAMPLE_MODE
    if text in {str(mode) for mode in SAMPLE_MODES}:
        return int(text)
    modes = ", ".join(f"{mode} ({meaning})" for mode, meaning in SAMPLE_MODES.items())
    raise ValueError(f"sample_mode must be one of {modes}, got {shown(text)}")


def number(params, name, default, parse, what):
    """params[name] read by `parse` (one of cli's flag types), or default when absent; a value it refuses is a
    ValueError saying that `name` must be `what`."""
    text = params.get(name)
    if text is None:
        return default
    try:
        return parse(text)
    except argparse.ArgumentTypeError:
        raise ValueError(f"{name} must be {what}, got {shown(text)}") from None


def shown(value):
    """A value quoted for a one-line reason, cut short when long."""
    text = str(value)
    return repr(text) if len(text) <= SHOWN_VALUE_CHARS else repr(text[:SHOWN_VALUE_CHARS]) + "..."


# ----------------------------------------------------------------------------------------------------------
# The model (loaded once, by an engine plugin) and the slots that bound the work in progress


class RequestSlots:
    """At most `running` requests generate at once and `waiting` more wait for a turn; any further request,
    and every waiting one once the server stops, is answered 503 at once instead of piling up."""

    def __init__(self, running, waiting):
        self.running, self.waiting = running, waiting
        self.admitted = threading.BoundedSemaphore(running + waiting)
        self.generating = threading.BoundedSemaphore(running)
        self.closed = threading.Event()

    @contextlib.contextmanager
    def hold(self):
        """Wait for a generating slot while the body runs; raise HTTPError 503 when none can be had."""
        if self.closed.is_set():
            raise cherrypy.HTTPError(503, "the server is shutting down")
        if not self.admitted.acquire(blocking=False):
            raise cherrypy.HTTPError(503, f"busy: {self.running} requests are generating and {self.waiting} "
                                          f"waiting (--threads, --queue); retry in a moment")
        try:
            while not self.generating.acquire(timeout=SLOT_POLL_S):
                if self.closed.is_set():
                    raise cherrypy.HTTPError(503, "the server is shutting down")
            try:
                yield
            finally:
                self.generating.release()
        finally:
            self.admitted.release()


class StartupFailed(SystemExit):
    """The model could not be loaded. A SystemExit, because CherryPy's engine lets that one out of start() as
    it is; any other exception it logs with its traceback and ends the process with code 70. serve() turns it
    into one line on stderr."""

    def __init__(self, error):
        super().__init__(1)
        self.error = error


class ModelPlugin(SimplePlugin):
    """Loads and warms up the model when the engine starts, before the HTTP server listens; closes the request
    slots when it stops, so that waiting requests are answered at once, and stops the generations in progress
    once `grace` seconds have passed, so that shutdown takes at most that long (plus one block) whatever n is."""

    def __init__(self, bus, save_dir, word_level, slots, grace=0.0):
        super().__init__(bus)
        self.save_dir, self.word_level, self.slots, self.grace = save_dir, word_level, slots, grace
        self.sampler = None
        self.description = None

    def start(self):
        # Imported here, after serve() has imported TensorFlow quietly.
        from sampler import Sampler
        self.bus.log(f"Loading the model in {self.save_dir}")
        try:
            sampler = Sampler.load(self.save_dir, self.word_level)
        except (ValueError, OSError) as error:
            raise StartupFailed(error)
        # The first call traces and compiles the generator; do it now rather than in the first request.
        sampler.sample("", 1, temperature=1.0, seed=0)
        config = sampler.config
        self.description = (f"{self.save_dir}: {config['model']} {config['num_layers']}x{config['rnn_size']}, "
                            f"{'word' if sampler.word_level else 'character'} level, {len(sampler.vocab)} tokens")
        self.sampler = sampler
        self.slots.closed.clear()
        self.bus.log(f"Model ready: {self.description}")
    start.priority = 10  # first: the HTTP server (75) listens only once the model is ready

    def stop(self):
        self.slots.closed.set()
        if self.sampler is not None:
            # A daemon timer: when nothing is generating, the process exits without waiting for it.
            timer = threading.Timer(self.grace, self.sampler.generator.stop)
            timer.daemon = True
            timer.start()
    stop.priority = 10  # before the HTTP server (25) waits for its worker threads


# ----------------------------------------------------------------------------------------------------------
# The endpoints


class SampleService:
    """GET / (text/plain), GET /sample.json and GET /health."""

    def __init__(self, model, limits):
        self.model, self.limits = model, limits

    @cherrypy.expose
    def index(self, **params):
        """The prime followed by the generated text, exactly as sample.py prints it (without its final newline)."""
        request, text = self.sample(params)
        cherrypy.response.headers["Content-Type"] = PLAIN_TEXT
        cherrypy.response.headers["X-Seed"] = str(request.seed)
        return text.encode("utf-8")

    @cherrypy.expose
    @cherrypy.tools.json_out()
    def sample_json(self, **params):
        """{"text": ..., and every setting used, "seed" included}; CherryPy maps /sample.json to this name."""
        request, text = self.sample(params)
        return {"text": text, "prime": request.prime, "n": request.n, "sample_mode": request.mode,
                "temperature": request.temperature, "seed": request.seed, "top_k": request.top_k,
                "top_p": request.top_p}

    @cherrypy.expose
    def health(self, **params):
        """"ok" and which model is served; the server listens only once the model is loaded."""
        if params:
            raise cherrypy.HTTPError(400, "/health takes no parameters")
        cherrypy.response.headers["Content-Type"] = PLAIN_TEXT
        return f"ok: {self.model.description}\n".encode("utf-8")

    def sample(self, params):
        """Check the parameters, wait for a slot, generate; returns (SampleSettings, text)."""
        from sampler import GenerationStopped  # imported with TensorFlow by the model plugin
        sampler = self.model.sampler
        try:
            request = parse_request(params, self.limits)
            sampler.encode(request.prime)  # refuse unknown characters before waiting for a slot
            with self.model.slots.hold():
                text = sampler.run(request)
        except ValueError as error:
            raise cherrypy.HTTPError(400, str(error))
        except GenerationStopped:
            raise cherrypy.HTTPError(503, "the server is shutting down; the generation was stopped") from None
        return request, text


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


def plain_error_page(status, message, traceback, version):
    """error_page.default: the reason on one line of plain text (the traceback, if any, stays in the log)."""
    headers = cherrypy.serving.response.headers
    headers["Content-Type"] = PLAIN_TEXT
    if status.startswith("503"):
        headers["Retry-After"] = RETRY_AFTER_S
    # CherryPy hands the message over HTML-escaped.
    return " ".join(html.unescape(message).splitlines()) + "\n"


def trim_error_padding():
    """CherryPy pads short error bodies with spaces to 513 bytes (for Internet Explorer 5's "friendly" error
    pages); a plain-text answer is its one line."""
    response = cherrypy.serving.response
    if response.status is not None and httputil.valid_status(response.status)[0] >= 400:
        body = response.collapse_body().rstrip(b" ")
        response.body = body
        response.headers["Content-Length"] = str(len(body))


def internal_error():
    """request.error_response: an unexpected exception answers 500 with one line (its traceback is logged)."""
    cherrypy.HTTPError(500, "internal error; the server log has the details").set_response()
    trim_error_padding()


cherrypy.tools.check_query_string = cherrypy.Tool("on_start_resource", check_query_string)
cherrypy.tools.trim_error_padding = cherrypy.Tool("before_finalize", trim_error_padding)


# ----------------------------------------------------------------------------------------------------------
# Configuration and start


def server_config(args):
    """Settings of the HTTP server and the engine, for cherrypy.config.update."""
    config = {
        "server.socket_host": args.host,
        "server.socket_port": args.port,
        "server.thread_pool": args.threads + args.queue + SPARE_WORKERS,
        "server.socket_queue_size": LISTEN_BACKLOG,
        # cheroot's default is 10 s: with every worker thread reading from a client that sent part of a request
        # and went silent, a normal request would wait that long (or a multiple) for a free thread.
        "server.socket_timeout": args.socket_timeout,
        "engine.autoreload.on": False,  # a reload would load TensorFlow and the model again
    }
    if args.production:
        config["environment"] = "production"
    return config


def app_config():
    """The application's settings, for tree.mount: GET and HEAD only, every error one line of plain text."""
    return {"/": {
        "tools.allow.on": True,
        "tools.allow.methods": ["GET", "HEAD"],
        "tools.check_query_string.on": True,
        "tools.trim_error_padding.on": True,
        "tools.encode.on": False,  # the handlers answer UTF-8 bytes with their own Content-Type
        "request.show_tracebacks": False,
        "request.show_mismatched_params": False,
        "request.error_response": internal_error,
        "error_page.default": plain_error_page,
    }}


def check_port_free(host, port):
    """Raise OSError with a one-line message when host:port cannot be listened on (CherryPy would log a
    traceback instead)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as CherryPy's own socket does
            probe.bind(address)
    except OSError as error:
        raise OSError(f"cannot listen on {host}:{port} ({error.strerror or error}); "
                      f"choose another --port or --host") from None


class Shutdown:
    """Stops the engine on SIGTERM, SIGHUP or Ctrl-C: the server stops listening, answers the waiting requests
    503, lets the ones it is generating run for --shutdown_grace seconds and then stops them (answered 503 too),
    and the process exits with code 0. A signal that arrives while
    the engine is starting (loading the model, opening the socket) takes effect once it has started, because
    CherryPy ends the process with code 70 when exit() interrupts start()."""

    def __init__(self, engine):
        self.engine = engine
        self.requested = False

    def __call__(self):
        if self.engine.state == states.STARTING:
            self.requested = True
        else:
            self.engine.exit()

    def subscribe(self):
        """Install this as the engine's handler of SIGTERM, SIGHUP and, unless it is ignored, SIGINT."""
        names = ["SIGTERM", "SIGHUP"]
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # a background job ignores Ctrl-C
            names.append("SIGINT")
        for name in names:
            self.engine.signal_handler.handlers[name] = self
        self.engine.signal_handler.subscribe()


def serve(args):
    """Load the model, serve until SIGTERM or Ctrl-C; returns 0."""
    check_port_free(args.host, args.port)  # before the slow start, so that a busy port fails at once
    cli.quiet_tensorflow()  # the model plugin imports sampler, and with it TensorFlow
    engine = cherrypy.engine
    slots = RequestSlots(args.threads, args.queue)
    model = ModelPlugin(engine, args.save_dir, args.word_level, slots, args.shutdown_grace)
    model.subscribe()
    cherrypy.config.update(server_config(args))
    cherrypy.tree.mount(SampleService(model, Limits(args.max_n, args.max_prime, args.temperature)), "/",
                        app_config())
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
    return cli.run(lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
