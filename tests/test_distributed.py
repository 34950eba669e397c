"""Training on several devices and machines (distribution.py): two replicas of a split CPU, and two worker
processes on 127.0.0.1 with TF_CONFIG, train exactly as one device does, resume each other's checkpoints, and stop
with one line when a worker is lost. Each run is a train.py process: the CPU split and the cluster are set when
TensorFlow starts its devices."""
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import distribution
import savedir
import train
from conftest import (
    REPO,
    SPAWN_TIMEOUT_S,
    ctrl_c_not_ignored,
    error_line,
    make_data_dir,
    newest_step,
    run_script,
    wait_for,
)
from servers import end_process, free_port

TOLERANCE = 1e-4
WORKERS = 2
# Two layers, so that the replicas' split runs through a stacked network; 8 streams, 4 per replica. The small
# --grad_clip clips most steps: clipping each replica's gradient instead of their sum would show.
MODEL = ["--rnn_size", "16", "--num_layers", "2", "--batch_size", "8", "--seq_length", "10", "--seed", "1",
         "--print_every", "1", "--save_every", "5", "--grad_clip", "0.1"]
MIRRORED = ["--strategy", "mirrored", "--replicas", "2"]
LOST_WORKER_S = 90  # a worker's loss must end the others within about a minute (health checks every 30 s)
NEVER = 10 ** 9  # a --save_every that no test run reaches
SIGNAL_S = 30  # a waiting worker ends within seconds of SIGINT or SIGTERM; more than that is a hang


def flags(data, save, *extra):
    return ["--data_dir", data, "--save_dir", save, *MODEL, *map(str, extra)]


def train_ok(*args, env=None):
    result = run_script("train.py", *args, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def worker_env(cluster, index):
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}})}


def start_workers(args, logs):
    """WORKERS train.py processes forming one multi_worker cluster on 127.0.0.1, each writing to logs/worker<i>
    (and its temporary files to logs/tmp)."""
    cluster = [f"127.0.0.1:{free_port()}" for _ in range(WORKERS)]
    processes = []
    os.makedirs(os.path.join(logs, "tmp"), exist_ok=True)
    with ctrl_c_not_ignored():
        for index in range(WORKERS):
            log = open(os.path.join(logs, f"worker{index}"), "w")
            env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=os.path.join(logs, "tmp"),
                       **worker_env(cluster, index))
            processes.append(subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args, "--strategy",
                                               "multi_worker"], stdout=log, stderr=subprocess.STDOUT, env=env))
            log.close()
    return processes, cluster


def output(logs, index):
    with open(os.path.join(logs, f"worker{index}")) as f:
        return f.read()


def steps_printed(text):
    """The steps whose progress line ("12/340 (epoch 0), ...") a worker printed."""
    return [int(step) for step in re.findall(r"^(\d+)/\d+ \(epoch", text, re.MULTILINE)]


def run_workers(args, logs):
    processes, _ = start_workers(args, logs)
    try:
        for index, process in enumerate(processes):
            assert process.wait(timeout=300) == 0, output(logs, index)[-2000:]
    finally:
        for process in processes:
            end_process(process)
    return [output(logs, index) for index in range(WORKERS)]


def train_losses(save):
    """{step: training loss} from metrics.csv."""
    with open(os.path.join(save, savedir.METRICS_FILE)) as f:
        return {int(row["step"]): float(row["train_loss"]) for row in csv.DictReader(f) if row["train_loss"]}


def checkpoint_values(save, step):
    """Every value the checkpoint of `step` holds (weights, Adam's slots, counters, carried state, dropout seeds)."""
    reader = tf.train.load_checkpoint(os.path.join(save, f"{checkpoints.CHECKPOINT_NAME}-{step}"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "OBJECT_GRAPH" not in name and not name.startswith("save_counter")}


def assert_same_training(reference, other, steps):
    """`other` made the same training losses at `steps` as `reference`, and its last checkpoint equals the
    reference's checkpoint of the same step, within TOLERANCE."""
    expected, got = train_losses(reference), train_losses(other)
    for step in steps:
        assert got[step] == pytest.approx(expected[step], abs=TOLERANCE), step
    last = steps[-1]
    expected, got = checkpoint_values(reference, last), checkpoint_values(other, last)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name].astype(np.float64), expected[name].astype(np.float64), rtol=0,
                                   atol=TOLERANCE, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_two_replicas_and_two_workers_train_and_resume_as_one_device(tmp_path, dropout):
    data = make_data_dir(tmp_path / "data")
    one, replicas, workers = (str(tmp_path / name) for name in ("one", "replicas", "workers"))
    # One device runs in here (TensorFlow is already started); the distributed runs are train.py processes.
    assert train.main(flags(data, one, "--dropout", dropout, "--max_steps", 30, "--strategy", "one")) == 0

    result = train_ok(*flags(data, replicas, "--dropout", dropout, "--max_steps", 20, *MIRRORED))
    assert "training on 2 replicas (mirrored)" in result.stdout
    assert_same_training(one, replicas, range(1, 21))

    logs = run_workers(flags(data, workers, "--dropout", dropout, "--max_steps", 20), tmp_path / "logs")
    assert "this is worker 0, the chief" in logs[0] and "this is worker 1, not the chief" in logs[1]
    assert_same_training(one, workers, range(1, 21))
    # Only the chief wrote: the other worker's temporary save dir is gone.
    assert os.listdir(tmp_path / "logs" / "tmp") == []

    if not dropout:
        return  # the resumes below are the same without dropout, less the dropout seeds
    # The workers' save dir resumes on one device, and that one on two replicas: still the one-device run.
    assert train.main(flags(data, workers, "--init_from", workers, "--max_steps", 25, "--strategy", "one")) == 0
    result = train_ok(*flags(data, workers, "--init_from", workers, "--max_steps", 30, *MIRRORED))
    assert "step 25, epoch 0, batch 25/" in result.stdout
    assert_same_training(one, workers, range(1, 31))


@pytest.mark.slow
def test_a_lost_worker_stops_the_others_with_one_line_and_all_resume(tmp_path):
    data = make_data_dir(tmp_path / "data")
    save = str(tmp_path / "save")
    args = flags(data, save, "--num_epochs", 1000, "--print_every", 1000, "--save_every", 20)
    processes, cluster = start_workers(args, tmp_path / "first")
    try:
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not checkpoints.has_checkpoint(save):
            assert processes[0].poll() is None, output(tmp_path / "first", 0)
            assert time.monotonic() < deadline, "no checkpoint from the workers"
            time.sleep(0.1)
        processes[1].terminate()  # SIGTERM ends a training worker at once, as it does one device's run
        assert processes[1].wait(timeout=SIGNAL_S) == -signal.SIGTERM
        killed = time.monotonic()
        assert processes[0].wait(timeout=LOST_WORKER_S) == 1
        assert time.monotonic() - killed < LOST_WORKER_S
    finally:
        for process in processes:
            end_process(process)
    last = output(tmp_path / "first", 0).strip().splitlines()[-1]
    assert last.startswith(f"error: worker 1 ({cluster[1]}) stopped or was lost") and save in last, last
    saved = newest_step(save)

    # Every worker restarted with --init_from resumes from the last checkpoint; Ctrl-C on the chief then stops all.
    # No checkpoint falls due in this run, and the chief is interrupted once it printed a step after the resume:
    # it has a step to save then, however slow the machine.
    again = tmp_path / "again"
    processes, cluster = start_workers([*args, "--init_from", save, "--print_every", "1", "--save_every", str(NEVER)],
                                       again)
    try:
        wait_for(lambda: any(step > saved for step in steps_printed(output(again, 0))), processes[0],
                 "step after the resume")
        processes[0].send_signal(signal.SIGINT)
        assert processes[0].wait(timeout=60) == 130
        assert processes[1].wait(timeout=LOST_WORKER_S) == 1
    finally:
        for process in processes:
            end_process(process)
    chief, other = output(again, 0), output(again, 1)
    assert f"resumed from {os.path.join(save, checkpoints.CHECKPOINT_NAME)}-{saved}: step {saved}," in chief
    assert f"resumed from {os.path.join(save, checkpoints.CHECKPOINT_NAME)}-{saved}: step {saved}," in other
    assert "interrupted: checkpoint written" in chief
    assert newest_step(save) > saved
    assert other.strip().splitlines()[-1].startswith(f"error: worker 0 ({cluster[0]}) stopped or was lost")


def lone_worker(data, save, *extra, peer=None, port=None):
    """train.py as worker 0 of a two-worker cluster on 127.0.0.1 whose worker 1 never starts: (args, env, port)."""
    port = port or free_port()
    cluster = [f"127.0.0.1:{port}", peer or f"127.0.0.1:{free_port()}"]
    return [*flags(data, save, "--strategy", "multi_worker", *extra)], worker_env(cluster, 0), port


def listening(port):
    """True when something accepts connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_a_worker_whose_port_is_taken_says_so_in_one_line(tmp_path):
    data, save = make_data_dir(tmp_path / "data"), str(tmp_path / "save")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args, env, _ = lone_worker(data, save, port=port)
        result = run_script("train.py", *args, env=env, timeout=SPAWN_TIMEOUT_S)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: worker 0 cannot listen on 127.0.0.1:{port}: Address already in use "
                                     f"(another program has port {port}: stop it, or give this worker another port "
                                     f"in TF_CONFIG)"), result.stderr
    assert not os.path.exists(save)


@pytest.mark.slow
def test_a_worker_whose_peers_never_start_stops_with_one_line_after_the_cluster_timeout(tmp_path):
    data, save = make_data_dir(tmp_path / "data"), str(tmp_path / "save")
    peer = f"127.0.0.1:{free_port()}"
    args, env, _ = lone_worker(data, save, "--cluster_timeout", 2, peer=peer)
    result = run_script("train.py", *args, env=env, timeout=SPAWN_TIMEOUT_S)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: worker 0 waited 2 s for the cluster, but worker 1 ({peer}) did not "
                                     f"meet it: start every worker that TF_CONFIG names, with the same cluster "
                                     f"(--cluster_timeout sets the wait)"), result.stderr
    assert "worker 0 waits up to 2 s for the other workers" in result.stdout
    assert not os.path.exists(save)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_a_waiting_worker_ends_on_sigint_or_sigterm_with_one_line(tmp_path, signum, code, line):
    data, save = make_data_dir(tmp_path / "data"), str(tmp_path / "save")
    args, env, port = lone_worker(data, save)  # the default --cluster_timeout, minutes
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "w") as stdout, open(err, "w") as stderr, ctrl_c_not_ignored():
        process = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args], stdout=stdout,
                                   stderr=stderr, env=dict(os.environ, PYTHONUNBUFFERED="1", **env))
    try:
        wait_for(lambda: listening(port), process, "worker listening on its port")
        process.send_signal(signum)
        assert process.wait(timeout=SIGNAL_S) == code
    finally:
        end_process(process)
    assert err.read_text().strip().splitlines() == [line]
    assert not os.path.exists(save)


@pytest.mark.slow
def test_a_batch_that_does_not_divide_among_the_replicas_is_refused(tmp_path):
    data = make_data_dir(tmp_path / "data")
    result = run_script("train.py", *flags(data, tmp_path / "save", "--strategy", "mirrored", "--replicas", 3))
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: batch_size 8 does not divide among 3 replicas: give a batch_size that "
                                     "is a multiple of 3")
    assert not os.path.exists(tmp_path / "save")


@pytest.mark.parametrize("args, tf_config, message", [
    (["--strategy", "one", "--replicas", "2"], None, "--replicas 2 needs --strategy mirrored"),
    (["--strategy", "multi_worker"], None, "--strategy multi_worker needs TF_CONFIG"),
    (["--strategy", "multi_worker", "--replicas", "2"], {"cluster": {"worker": ["a:1", "b:2"]},
                                                         "task": {"type": "worker", "index": 0}},
     "--replicas is for --strategy mirrored"),
    ([], "{not json", "TF_CONFIG is not valid JSON"),
    ([], {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}, 'TF_CONFIG\'s "task" must name'),
    ([], {"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}, 'TF_CONFIG\'s "cluster" must map'),
    ([], {"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}},
     "cluster has job 'ps'"),
])
def test_bad_strategy_settings_are_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, args,
                                                                       tf_config, message):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config if isinstance(tf_config, str) else json.dumps(tf_config))
    data = make_data_dir(tmp_path / "data")
    assert train.main(flags(data, str(tmp_path / "save"), *args)) == 2
    assert message in error_line(capsys)
    assert not os.path.exists(tmp_path / "save")


def test_workers_meet_whatever_order_they_start_in_and_free_their_ports():
    cluster = {"chief": [f"127.0.0.1:{free_port()}"], "worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
    tasks = [("chief", 0), ("worker", 0), ("worker", 1)]
    outcomes = {}

    def meet(task, delay):
        time.sleep(delay)
        try:
            distribution.rendezvous(cluster, task, SPAWN_TIMEOUT_S)
            outcomes[task] = "met"
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            outcomes[task] = repr(e)
    threads = [threading.Thread(target=meet, args=(task, delay)) for task, delay in zip(tasks, (1.0, 0.0, 0.5))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == {task: "met" for task in tasks}
    for addresses in cluster.values():  # TensorFlow can have every port now
        for address in addresses:
            socket.create_server(("", distribution.split_address(address)[1])).close()


def test_auto_is_one_device_without_a_cluster_or_gpus():
    chosen = distribution.choose("auto", 0, environ={})
    assert (chosen.name, chosen.replicas, chosen.is_chief) == ("one", 1, True)
    single = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}})}
    assert distribution.choose("auto", 0, environ=single).name == "one"


def test_help_lists_the_strategies():
    result = run_script("train.py", "--help")
    assert "--strategy {auto,one,mirrored,multi_worker}" in result.stdout and "--replicas" in result.stdout
