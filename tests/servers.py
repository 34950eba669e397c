"""Test helpers for sample_server.py processes (not tests): a free port, a server started and ended whatever
happens, and HTTP GET. Servers listen on loopback addresses only."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from conftest import REPO, ctrl_c_not_ignored

START_TIMEOUT_S = 120  # importing TensorFlow and loading the model, on a busy machine
REQUEST_TIMEOUT_S = 60


def free_port(host="127.0.0.1"):
    """A port nobody listens on right now (CherryPy cannot report the port it got for port 0); another process may
    take it before the server binds it, so Server tries another one then."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def end_process(process):
    """Terminate a child process, kill it if it lingers, and wait for it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


# What the server says when it cannot have its port (its own check, or CherryPy's once the model is loaded).
LOST_PORT_SIGNS = ("cannot listen on", "not free", "Address already in use")
PORT_ATTEMPTS = 5


class Server:
    """A sample_server.py process: url, process, and its log (stdout and stderr) in a file.

    When another process takes the port between free_port() and the server's bind, the server exits saying so and
    wait_until_ready starts it again on another port.
    """

    def __init__(self, save_dir, log_path, *flags, host="127.0.0.1", env=None):
        self.save_dir, self.log_path, self.flags, self.host = save_dir, log_path, flags, host
        # The server's environment: this one's, without API keys unless `env` (a dict of variables) gives some.
        self.env = {name: value for name, value in os.environ.items() if name != "CHAR_RNN_API_KEYS"}
        self.env.update(env or {}, PYTHONUNBUFFERED="1")
        self.process = None
        self.start()

    def start(self):
        self.port = free_port(self.host)
        self.url = f"http://{self.host}:{self.port}"
        with open(self.log_path, "w") as log, ctrl_c_not_ignored():
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(REPO, "sample_server.py"), "--save_dir", self.save_dir,
                 "--host", self.host, "--port", str(self.port), *map(str, self.flags)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def wait_until_ready(self):
        attempts = 1
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log()
                if attempts < PORT_ATTEMPTS and any(sign in log for sign in LOST_PORT_SIGNS):
                    self.process.wait()
                    attempts += 1
                    self.start()
                    deadline = time.monotonic() + START_TIMEOUT_S
                    continue
                raise AssertionError(f"the server exited early:\n{log}")
            with contextlib.suppress(OSError):
                if get(self.url + "/health")[0] == 200:
                    return self
            time.sleep(0.2)
        raise AssertionError(f"the server did not answer /health within {START_TIMEOUT_S} s:\n{self.log()}")

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        end_process(self.process)


@contextlib.contextmanager
def running_server(save_dir, log_path, *flags, host="127.0.0.1", env=None):
    server = Server(save_dir, log_path, *flags, host=host, env=env)
    try:
        yield server.wait_until_ready()
    finally:
        server.stop()


def get(url, timeout=REQUEST_TIMEOUT_S, headers=None):
    """GET url (with these request headers); returns (status, headers, body as text), whatever the status."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status, response.headers, response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read().decode("utf-8")


def post_json(url, body, timeout=REQUEST_TIMEOUT_S, headers=None):
    """POST body (an object to send as JSON, or bytes as they are) to url (with these request headers besides
    Content-Type); returns (status, headers, the answer read as JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, json.loads(error.read())


def read_events(response):
    """The Server-Sent Events of a text/event-stream response, as they come: (event name, data read as JSON)."""
    name, data = None, []
    for line in response:
        line = line.decode("utf-8").rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif not line and name is not None:
            yield name, json.loads("\n".join(data))
            name, data = None, []


def stream(url, timeout=REQUEST_TIMEOUT_S):
    """GET a /stream url to its end; returns (status, headers, [(event, data), ...]), or the error's body text
    in place of the events."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers, list(read_events(response))
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read().decode("utf-8")


def raw_exchange(url, data, timeout=REQUEST_TIMEOUT_S):
    """Send `data` (bytes: a request, whole or cut short) on a connection of its own to url's server, then read
    until the server closes it; returns (status or None when it answered nothing, {lowercase header: value}, body
    bytes)."""
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    answer = b""
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(data)
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head:
        return None, {}, b""
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict((name.strip().lower(), value.strip()) for name, value in
                   (line.split(":", 1) for line in header_lines))
    return int(status_line.split()[1]), headers, body
