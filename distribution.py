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

The training step (trainer.make_train_step) gives each replica its contiguous share of the batch's streams and
all-reduces the gradients, so that the math is one device's (README: "Training on several devices").
"""
import dataclasses
import json
import os
import re

import tensorflow as tf

from settings import STRATEGIES
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


def choose(name="auto", replicas=0, environ=None):
    """The Distribution for --strategy `name` and --replicas `replicas` (0: every GPU, or one CPU device).

    Call before TensorFlow has set up its devices. ValueError (one line) for a combination that cannot run.
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
    return _multi_worker(tf_config)


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


def _multi_worker(tf_config):
    task = tf_config["task"]
    os.environ["TF_CONFIG"] = json.dumps(tf_config)  # the resolver reads it from there
    # AUTO: NCCL between GPUs, RING (over gRPC) between CPUs.
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    cluster = tf_config["cluster"]
    is_chief = task["type"] == "chief" or (task["type"] == "worker" and task["index"] == 0 and "chief" not in cluster)
    return Distribution(strategy, "multi_worker", is_chief, f"{task['type']} {task['index']}", cluster)
