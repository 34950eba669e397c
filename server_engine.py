"""The sampling server's process around its endpoints (sample_server.py): the model loaded and warmed up by an
engine plugin before the server listens, the generation started (batching.py), the HTTP server's settings (worker
threads, socket timeout, a gateway that honours "Connection: close"), the port checked before the slow start, and
the shutdown on SIGTERM, SIGHUP or Ctrl-C with its grace period for the generations in progress.
"""
import signal
import socket
import threading

import cheroot.wsgi
from cherrypy.process.plugins import SimplePlugin
from cherrypy.process.wspbus import states

import cli

# Worker threads beyond --max_batch (or --threads) + --queue: with every place taken, these still answer 503 and
# /health at once.
SPARE_WORKERS = 4
LISTEN_BACKLOG = 128  # connections the kernel holds before CherryPy accepts them (CherryPy's default is 5)


class StartupFailed(SystemExit):
    """The model could not be loaded. A SystemExit, because CherryPy's engine lets that one out of start() as
    it is; any other exception it logs with its traceback and ends the process with code 70. serve() turns it
    into one line on stderr."""

    def __init__(self, error):
        super().__init__(1)
        self.error = error


class ModelPlugin(SimplePlugin):
    """Loads and warms up the model when the engine starts, before the HTTP server listens, and starts the
    generation (a Batcher, or OneAtATime with --max_batch 0). When the engine stops, new requests are refused at
    once, and the generations in progress are stopped once `grace` seconds have passed, so that shutdown takes at
    most that long (plus one block) whatever n is."""

    def __init__(self, bus, args, metrics):
        super().__init__(bus)
        self.args, self.metrics = args, metrics
        self.sampler = self.generation = None
        self.description = None

    def start(self):
        # Imported here, after serve() has imported TensorFlow quietly.
        from batching import BatcherPool, OneAtATime, default_batchers
        from sampler import Sampler
        args = self.args
        self.bus.log(f"Loading the model in {args.save_dir}")
        try:
            sampler = Sampler.load(args.save_dir, args.word_level)
        except (ValueError, OSError) as error:
            raise StartupFailed(error)
        # The first call traces and compiles the generator; do it now rather than in the first request.
        sampler.sample("", 1, temperature=1.0, seed=0)
        network = sampler.model_config
        self.description = (f"{args.save_dir}: {network.model} {network.num_layers}x{network.rnn_size}, "
                            f"{'word' if sampler.word_level else 'character'} level, {len(sampler.vocab)} tokens")
        if args.max_batch:
            batchers = args.batchers or default_batchers(args.max_batch, cli.usable_cores())
            self.generation = BatcherPool(sampler, args.max_batch, args.max_wait_ms / 1000, args.queue, batchers,
                                          on_block=self.metrics.observe_block)
            how = f"batches of up to {args.max_batch} rows on {batchers} thread{'s' * (batchers > 1)}"
        else:
            self.generation = OneAtATime(sampler, args.threads, args.queue)
            self.generation.on_done = self.metrics.tokens.inc
            how = "no batching"
        self.metrics.watch(self.generation)
        self.sampler = sampler
        self.bus.log(f"Model ready: {self.description}, {how}")
    start.priority = 10  # first: the HTTP server (75) listens only once the model is ready

    def stop(self):
        if self.generation is not None:
            self.generation.close()
        if self.sampler is not None:
            # A daemon timer: when nothing is generating, the process exits without waiting for it.
            timer = threading.Timer(self.args.shutdown_grace, self.sampler.generator.stop)
            timer.daemon = True
            timer.start()
    stop.priority = 10  # before the HTTP server (25) waits for its worker threads


class ClosingGateway(cheroot.wsgi.Gateway_10):
    """cheroot's WSGI gateway, except that an answer with "Connection: close" closes the connection. cheroot sends
    the header but keeps the connection open; after a request body that timed out (read_body's 408), its next read
    of that socket fails with a traceback in the log."""

    def start_response(self, status, headers, exc_info=None):
        if any(name.lower() == "connection" and value.lower() == "close" for name, value in headers):
            self.req.close_connection = True
        return super().start_response(status, headers, exc_info)


# server.wsgi_version picks the gateway from cheroot's table, where CherryPy's documentation has custom ones added.
CLOSING_GATEWAY = ("char-rnn", 1, 0)
cheroot.wsgi.wsgi_gateways[CLOSING_GATEWAY] = ClosingGateway


def server_config(args):
    """Settings of the HTTP server and the engine, for cherrypy.config.update."""
    config = {
        "server.socket_host": args.host,
        "server.socket_port": args.port,
        # Each request in progress, generating or waiting, holds a worker thread until its answer is sent.
        "server.thread_pool": (args.max_batch or args.threads) + args.queue + SPARE_WORKERS,
        "server.socket_queue_size": LISTEN_BACKLOG,
        # cheroot's default is 10 s: with every worker thread reading from a client that sent part of a request
        # and went silent, a normal request would wait that long (or a multiple) for a free thread.
        "server.socket_timeout": args.socket_timeout,
        "server.wsgi_version": CLOSING_GATEWAY,
        "engine.autoreload.on": False,  # a reload would load TensorFlow and the model again
    }
    if args.production:
        config["environment"] = "production"
    return config


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
