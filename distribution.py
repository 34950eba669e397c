"""Training on several devices or machines: which tf.distribute strategy a run uses, and what each worker does.

choose(name, replicas) reads --strategy, --replicas and TF_CONFIG and returns a Distribution: the strategy, its
number of replicas in sync, and whether this process is the chief (the one worker that writes the save dir).
It must run before TensorFlow sets up its devices (a split CPU and a multi-worker cluster are set then).

    one           the default strategy: one device, as if tf.distribute were not there
    mirrored      tf.distribute.MirroredStrategy over the GPUs (or, without GPUs, the CPU split into --replicas
                  logical devices, to try it)
    multi_worker  tf.distribute.MultiWorkerMirroredStrategy over the machines that TF_CONFIG names
    auto          multi_worker when TF_CONFIG names a cluster of several tasks, mirrored when there are several
                  GPUs or --replicas asks for several, else one

A multi_worker run first meets its peers (rendezvous): each worker listens on its own TF_CONFIG port with a plain
socket and greets every other worker there, and TensorFlow, whose cluster start-up blocks in C++ where neither
Ctrl-C nor SIGTERM reaches Python, starts only once every worker has greeted every other. So a taken port is one
line naming the worker and its address, the wait for the others is bounded (--cluster_timeout), and SIGINT or
SIGTERM while waiting ends the worker with one line (exit code 130 or 143).

The training step (trainer.make_train_step) gives each replica its contiguous share of the batch's streams and
all-reduces the gradients, so that the math is one device's (README: "Training on several devices").
"""
import contextlib
import dataclasses
import itertools
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time

import tensorflow as tf

from settings import STRATEGIES, TRAIN_DEFAULTS

_LOST_TASK = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")


@dataclasses.dataclass(frozen=True)
class Distribution:
    """How a run is spread: the tf.distribute strategy and this process's part in it."""
    strategy: tf.distribute.Strategy
    name: str  # one, mirrored or multi_worker
    is_chief: bool = True
    task: str = ""  # the TF_CONFIG task of this process ("worker 1"); empty on one machine
    cluster: dict = dataclasses.field(default_factory=dict)

    @property
    def replicas(self):
        return self.strategy.num_replicas_in_sync

    def describe(self):
        """One line for the log: what runs where."""
        if self.name == "one":
            return "training on one device"
        if self.name == "mirrored":
            devices = ", ".join(self.strategy.extended.worker_devices)
            return f"training on {self.replicas} replicas (mirrored): {devices}"
        role = ("the chief, which writes the save dir" if self.is_chief else
                "not the chief: its checkpoints are temporary")
        return (f"training on {self.replicas} replicas over {cluster_size(self.cluster)} workers (multi_worker); "
                f"this is {self.task}, {role}")

    def lost_worker(self, error, save_dir):
        """The one line for a collective that failed because a worker went away (tf.errors.OpError)."""
        found = _LOST_TASK.search(error.message or "")
        who = "another worker"
        if found:
            job, index = found.group(1), int(found.group(2))
            addresses = self.cluster.get(job, [])
            address = f" ({addresses[index]})" if index < len(addresses) else ""
            who = f"{job} {index}{address}"
        return (f"{who} stopped or was lost ({error.__class__.__name__}); training stopped on "
                f"{self.task or 'this worker'}. Restart every worker with --init_from {save_dir} to resume from the "
                f"last checkpoint")


def one_device():
    """The Distribution of a run on one device."""
    return Distribution(tf.distribute.get_strategy(), "one")


def read_tf_config(environ=None):
    """TF_CONFIG as a dict ({} when unset); ValueError with one line when it is not what TensorFlow documents."""
    text = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(config, dict):
        raise ValueError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(addresses, list) and addresses and all(isinstance(a, str) and ":" in a for a in addresses)
            for addresses in cluster.values()):
        raise ValueError('TF_CONFIG\'s "cluster" must map job names to lists of "host:port" addresses, e.g. '
                         '{"worker": ["host1:12345", "host2:12345"]}')
    unknown = set(cluster) - {"chief", "worker"}
    if unknown:
        raise ValueError(f"TF_CONFIG's cluster has job {sorted(unknown)[0]!r}: multi_worker training uses only "
                         f"'worker' (and optionally one 'chief')")
    if not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int) \
            or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise ValueError('TF_CONFIG\'s "task" must name this process\'s job and index in the cluster, e.g. '
                         '{"type": "worker", "index": 0}')
    return config


def cluster_size(cluster):
    """How many tasks (machines or processes) a TF_CONFIG cluster names."""
    return sum(len(addresses) for addresses in cluster.values())


def choose(name="auto", replicas=0, environ=None, cluster_timeout=TRAIN_DEFAULTS.cluster_timeout):
    """The Distribution for --strategy `name` and --replicas `replicas` (0: every GPU, or one CPU device).

    Call before TensorFlow has set up its devices. ValueError (one line) for a combination that cannot run. A
    multi_worker run first waits up to `cluster_timeout` seconds for the other workers (see rendezvous).
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    tf_config = read_tf_config(environ)
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        if cluster_size(tf_config.get("cluster", {})) > 1:
            name = "multi_worker"
        elif len(gpus) > 1 or replicas > 1:
            name = "mirrored"
        else:
            name = "one"
    if name == "one":
        if replicas > 1:
            raise ValueError(f"--replicas {replicas} needs --strategy mirrored (or auto)")
        return one_device()
    if name == "mirrored":
        return Distribution(_mirrored(gpus, replicas), "mirrored")
    if not tf_config:
        raise ValueError("--strategy multi_worker needs TF_CONFIG naming the cluster and this worker's task "
                         "(README: Training on several machines)")
    if replicas:
        raise ValueError("--replicas is for --strategy mirrored; a multi_worker run uses every GPU of each "
                         "worker (or its CPU)")
    return _multi_worker(tf_config, cluster_timeout)


def _mirrored(gpus, replicas):
    if gpus:
        if replicas > len(gpus):
            raise ValueError(f"--replicas {replicas} asks for more GPUs than the {len(gpus)} this machine has")
        devices = [f"/gpu:{i}" for i in range(replicas or len(gpus))]
    else:
        replicas = replicas or 1
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
        except RuntimeError:  # devices already set up (a caller that ran TensorFlow ops before)
            if len(tf.config.list_logical_devices("CPU")) < replicas:
                raise ValueError(f"cannot split the CPU into {replicas} devices once TensorFlow has started")
        devices = [f"/cpu:{i}" for i in range(replicas)]
    return tf.distribute.MirroredStrategy(devices)


def _multi_worker(tf_config, cluster_timeout):
    task, cluster = tf_config["task"], tf_config["cluster"]
    with _sigterm_ends_in_one_line():
        rendezvous(cluster, (task["type"], task["index"]), cluster_timeout)
        os.environ["TF_CONFIG"] = json.dumps(tf_config)  # the resolver reads it from there
        # AUTO: NCCL between GPUs, RING (over gRPC) between CPUs.
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    is_chief = task["type"] == "chief" or (task["type"] == "worker" and task["index"] == 0 and "chief" not in cluster)
    return Distribution(strategy, "multi_worker", is_chief, f"{task['type']} {task['index']}", cluster)


# ----------------------------------------------------------------------------------------------------------
# Meeting the other workers before TensorFlow does

EXIT_TERMINATED = 143  # what a shell reports for a process that SIGTERM ended
GREETING = b"char-rnn-tensorflow worker "  # then the task's job and index, and a line break
GREETING_MAX_BYTES = 200
PROBE_INTERVAL_S = 0.2  # between two rounds of greetings to the workers not yet met
ANSWER_TIMEOUT_S = 2.0  # for a peer to answer a greeting (it answers at once; more is another program, or none)


@contextlib.contextmanager
def _sigterm_ends_in_one_line():
    """While this runs, SIGTERM ends the process with one line and exit code 143, as Ctrl-C does with 130.

    Afterwards SIGTERM does again what it did before (by default, end the process at once): TensorFlow's cluster
    start-up puts in a handler of its own, which would swallow it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def terminated(signum, frame):
        print("terminated", file=sys.stderr)
        raise SystemExit(EXIT_TERMINATED)
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def task_name(task):
    """("worker", 1) -> "worker 1"."""
    return f"{task[0]} {task[1]}"


def split_address(address):
    """"host:port" -> (host, port); ValueError naming the address when the port is not a port number."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"TF_CONFIG's address {address!r} has no port number (1 to 65535) after its last ':'")
    return host.strip("[]"), int(port)


def rendezvous(cluster, me, timeout):
    """Wait until every task of a TF_CONFIG `cluster` has greeted this one (`me`, a (job, index) pair) on its own
    port and answered this one's greeting on theirs, then free the port for TensorFlow.

    A worker stops answering only once each other one has greeted it: no worker can then still be waiting for it,
    so every worker leaves the rendezvous, and TensorFlow starts when all of them are there. ConnectionError (one
    line, naming the worker and its address) when the port is taken; TimeoutError naming the workers not met
    after `timeout` seconds. Ctrl-C while waiting is KeyboardInterrupt, as anywhere in Python.
    """
    addresses = {(job, index): address for job, job_addresses in cluster.items()
                 for index, address in enumerate(job_addresses)}
    peers = {task: split_address(address) for task, address in addresses.items() if task != me}
    answerer = _Answerer(_listen(me, addresses[me]), me, peers)
    answerer.start()
    reached = set()  # the peers that answered our greeting
    deadline = time.monotonic() + timeout
    try:
        for round_ in itertools.count():
            for task in sorted(set(peers) - reached):
                if _greet(peers[task], me, task):
                    reached.add(task)
            if reached == set(peers) and answerer.greeted_by == set(peers):
                return
            if time.monotonic() > deadline:
                missing = sorted(set(peers) - (reached & answerer.greeted_by))
                raise TimeoutError(
                    f"{task_name(me)} waited {timeout:g} s for the cluster, but "
                    f"{', '.join(f'{task_name(t)} ({addresses[t]})' for t in missing)} did not meet it: start every "
                    f"worker that TF_CONFIG names, with the same cluster (--cluster_timeout sets the wait)")
            if round_ == 0:
                print(f"{task_name(me)} waits up to {timeout:g} s for the other workers of the cluster", flush=True)
            time.sleep(PROBE_INTERVAL_S)
    finally:
        answerer.stop()


class _Answerer(threading.Thread):
    """Answers the peers' greetings on this task's port, in the background, so that two workers greeting each
    other at the same moment are both answered; greeted_by holds the peers that greeted it."""

    def __init__(self, listener, me, peers):
        super().__init__(name="rendezvous", daemon=True)
        self.listener, self.me, self.peers = listener, me, peers
        self.greeted_by = set()
        self.stopping = threading.Event()

    def run(self):
        try:
            while not self.stopping.is_set():
                if select.select([self.listener], [], [], PROBE_INTERVAL_S)[0]:
                    self.answer()
        finally:
            self.listener.close()

    def stop(self):
        """Stop answering and free the port (the socket is closed when this returns)."""
        self.stopping.set()
        self.join()

    def answer(self):
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            try:
                connection.settimeout(ANSWER_TIMEOUT_S)
                line = _read_line(connection)
                sender = next((task for task in self.peers if line == _greeting(task)), None)
                if sender is None:  # another program, or a peer's TensorFlow already looking for us
                    return
                connection.sendall(_greeting(self.me))
                self.greeted_by = self.greeted_by | {sender}  # a new set: the main thread reads it
                connection.recv(1)  # its end closes first, so that our port is left with no TIME_WAIT
            except OSError:
                return


def _listen(me, address):
    """A socket listening on this task's port, on every interface as TensorFlow's server will; ConnectionError
    naming the task and its address when the port cannot be had."""
    _, port = split_address(address)
    try:
        return socket.create_server(("", port), backlog=16)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise ConnectionError(f"{task_name(me)} cannot listen on {address}: {reason} (another program "
                              f"has port {port}: stop it, or give this worker another port in TF_CONFIG)") from None


def _greeting(task):
    return GREETING + f"{task[0]} {task[1]}\n".encode()


def _greet(address, me, peer):
    """Greet `peer` at `address`; True when it answered as that task."""
    try:
        with socket.create_connection(address, timeout=ANSWER_TIMEOUT_S) as connection:
            connection.sendall(_greeting(me))
            return _read_line(connection) == _greeting(peer)
    except OSError:  # not listening yet, or gone, or another program there
        return False


def _read_line(connection):
    """Bytes up to and with the first line break (or what came before the peer closed or went quiet)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < GREETING_MAX_BYTES:
        chunk = connection.recv(GREETING_MAX_BYTES - len(data))
        if not chunk:
            break
        data += chunk
    return data
