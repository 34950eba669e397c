"""The sampling server's metrics, in the Prometheus text format (GET /metrics), with prometheus_client.

char_rnn_requests_total{endpoint, status}   requests answered
char_rnn_request_seconds{endpoint}          latency, from the request's arrival to its last byte (a stream's end)
char_rnn_queue_depth                        requests waiting for a row of the batch (or a thread)
char_rnn_generating                         requests generating now (rows of the batch)
char_rnn_batch_rows                         rows of each generated block (batching only)
char_rnn_tokens_generated_total             tokens generated
char_rnn_unauthorized_requests_total        requests refused for a missing or wrong API key (401)
"""
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Endpoints counted by name; any other path counts as "other", so that scanners cannot grow the label set.
ENDPOINTS = ("/", "/sample.json", "/stream", "/generate", "/ui", "/settings", "/metrics", "/health", "/v1/completions",
             "/v1/models")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The server's counters, in a registry of their own (not prometheus_client's global one)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("char_rnn_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("char_rnn_request_seconds", "Seconds from a request's arrival to the end of its "
                                 "answer", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("char_rnn_queue_depth", "Requests waiting for a row of the batch",
                                 registry=self.registry)
        self.generating = Gauge("char_rnn_generating", "Requests generating now (rows of the batch)",
                                registry=self.registry)
        self.batch_rows = Histogram("char_rnn_batch_rows", "Rows of each generated block (of at most 128 tokens)",
                                    buckets=ROW_BUCKETS, registry=self.registry)
        self.tokens = Counter("char_rnn_tokens_generated", "Tokens generated", registry=self.registry)
        self.unauthorized = Counter("char_rnn_unauthorized_requests", "Requests refused (401) for a missing or wrong "
                                    "API key", registry=self.registry)

    def watch(self, generation):
        """Read the queue depth and the rows generating from a Batcher (or OneAtATime) at each scrape."""
        self.queue_depth.set_function(lambda: generation.waiting)
        self.generating.set_function(lambda: generation.rows)

    def observe_block(self, rows, tokens):
        """A Batcher's block is done: `rows` rows made `tokens` tokens."""
        self.batch_rows.observe(rows)
        self.tokens.inc(tokens)

    def observe_request(self, path, status, started):
        """A request to `path` was answered with `status` (an int); it arrived at time.perf_counter() `started`."""
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - started)

    def exposition(self):
        """(Content-Type, body) of GET /metrics."""
        return CONTENT_TYPE_LATEST, generate_latest(self.registry)
