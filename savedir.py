"""Everything about a save directory: its file names, config and vocabulary (read back typed: `read_saved`),
crash-safe saves and best/, the compatibility checks of a resume, the lock against two trainers, and `load()` for
sampling and serving. Finding and restoring the checkpoints themselves is checkpoints.py's.

Layout of a save dir (best/ holds the same files for the best model so far, plus model_info.yaml):
    config.yaml                 model and training settings (plain YAML, read with yaml.safe_load)
    vocab.json                  the tokens in id order (JSON round-trips every code point)
    checkpoint                  tf.train.CheckpointManager's index of checkpoints (relative paths)
    model.ckpt-<step>.index / .data-*
    metrics.csv                 the loss curves
    samples.txt                 the samples printed while training (--sample_every), each under a SAMPLE_HEADER
No pickle: loading a model never executes code from a file.
"""
import contextlib
import csv
import dataclasses
import errno
import fcntl
import glob
import io
import json
import math
import os
import re
import shutil
import sys

import tensorflow as tf
import yaml

import checkpoints
from files import atomic_write_bytes
from model import CharRNN
from settings import ModelConfig, TrainConfig

CONFIG_FILE = "config.yaml"
VOCAB_FILE = "vocab.json"
MODEL_INFO_FILE = "model_info.yaml"
METRICS_FILE = "metrics.csv"
LOCK_FILE = "train.lock"
LOG_DIR = "logs"  # TensorBoard's logs, inside the save dir unless --log_dir says otherwise
METRICS_COLUMNS = ("step", "epoch", "train_loss", "val_loss", "learning_rate", "tokens_per_s", "elapsed_s")
BEST_DIR = "best"
SAMPLES_FILE = "samples.txt"
# The line above each sample of samples.txt; a resume drops the samples of the steps it replays by these lines.
SAMPLE_HEADER = "step {step}, temperature {temperature:g}, seed {seed}:"
SAMPLE_HEADER_STEP = re.compile(r"^step (\d+), temperature \S+, seed \d+:$", re.MULTILINE)
# Settings that decide the shape or meaning of the weights: a resume must keep every one of them.
WEIGHT_FIELDS = ("model", "rnn_size", "num_layers", "word_level", "embedding_size", "vocab_size")


# ----------------------------------------------------------------------------------------------------------
# config.yaml and vocab.json


def write_yaml(path, data):
    """Write a dict as plain YAML, atomically."""
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=False).encode("ascii"))


def read_yaml(path):
    """Read a plain-YAML dict (safe_load: no objects are constructed)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML ({e.__class__.__name__}); the save dir is damaged")
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a settings mapping; the save dir is damaged")
    return data


def write_config(save_dir, config):
    """Write config.yaml into save_dir."""
    write_yaml(os.path.join(save_dir, CONFIG_FILE), config)


def read_config(save_dir):
    """Read save_dir/config.yaml; a missing file is a FileNotFoundError that says what a save dir is."""
    path = os.path.join(save_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --save_dir must be a directory written by train.py")
    config = read_yaml(path)
    missing = [field for field in WEIGHT_FIELDS if field not in config]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; the save dir is damaged")
    return config


def write_vocab(save_dir, vocab, unk_token=None):
    """Write the vocabulary (tokens in id order) and the unknown-word token as JSON."""
    data = json.dumps({"tokens": list(vocab), "unk_token": unk_token}, ensure_ascii=True, indent=0)
    atomic_write_bytes(os.path.join(save_dir, VOCAB_FILE), data.encode("ascii"))


def read_vocab(save_dir):
    """Read save_dir/vocab.json; returns (tokens in id order, unk_token or None)."""
    path = os.path.join(save_dir, VOCAB_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return list(data["tokens"]), data.get("unk_token")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: --save_dir must be a directory written by train.py")
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a vocabulary written by train.py; the save dir is damaged")


def saved_settings(config, model_config, unk_token):
    """What config.yaml holds: every flag of `config` (a TrainConfig), the model's config (with what the data
    decided) and the unk token."""
    return {**dataclasses.asdict(config), **model_config.to_dict(), "unk_token": unk_token}


def train_config(saved, vocab):
    """The TrainConfig of a config.yaml's settings. A setting added after the model was trained takes its default
    (the run had no other), except keep_crlf: a model trained before that flag existed (when CRLF was always kept)
    reads CRLF as two characters when its vocabulary has a carriage return. data_dir has none (a config.yaml
    without one does not say where its text is); entries that are no flag (the model's config, the unk token) are
    left out."""
    flags = {field.name for field in dataclasses.fields(TrainConfig)}
    values = {name: value for name, value in saved.items() if name in flags}
    values.setdefault("data_dir", None)
    values.setdefault("keep_crlf", "\r" in vocab)
    return TrainConfig(**values)


@dataclasses.dataclass(frozen=True)
class Saved:
    """A save dir's config.yaml and vocab.json, typed: the run's flags (settings.TrainConfig), the network
    (settings.ModelConfig), the tokens in id order and the unknown-word token."""
    train_config: TrainConfig
    model_config: ModelConfig
    vocab: list
    unk_token: str | None


def read_saved(save_dir):
    """Read a save dir's config.yaml and vocab.json into a Saved (see train_config for an older config.yaml)."""
    config = read_config(save_dir)
    vocab, unk_token = read_vocab(save_dir)
    return Saved(train_config(config, vocab), ModelConfig.from_dict(config), vocab, unk_token)


def check_resumable(save_dir, settings, vocab):
    """Raise (before anything is written) when save_dir holds no checkpoint or a model that a run with these
    settings and vocabulary cannot continue."""
    check_compatible(read_config(save_dir), read_vocab(save_dir)[0], settings, vocab)
    if not checkpoints.has_checkpoint(save_dir):
        raise FileNotFoundError(f"no checkpoint in {save_dir} to resume from")


def check_compatible(saved_config, saved_vocab, config, vocab):
    """Raise ValueError naming the first setting in which a resumed run differs from its checkpoint."""
    for field in WEIGHT_FIELDS:
        if saved_config.get(field) != config.get(field):
            raise ValueError(f"cannot resume: {field} is {config.get(field)!r} here but {saved_config.get(field)!r} "
                             f"in the checkpoint; train with the same {field} or use a new --save_dir")
    if list(saved_vocab) != list(vocab):
        raise ValueError("cannot resume: the vocabulary of this data differs from the checkpoint's "
                         "(other text or tokenization settings); use the same data or a new --save_dir")


# ----------------------------------------------------------------------------------------------------------
# Saving checkpoints crash-safely


@contextlib.contextmanager
def writing(save_dir, what):
    """Turn a failed write of `what` into save_dir (full disk, read-only, TensorFlow's own errors) into one OSError
    naming the save dir, after removing the half-written temporary folders; earlier checkpoints stay intact."""
    try:
        yield
    except (OSError, tf.errors.OpError) as error:
        for temporary in glob.glob(os.path.join(glob.escape(save_dir), "*_temp")) + [
                os.path.join(save_dir, BEST_DIR + ".new")]:
            shutil.rmtree(temporary, ignore_errors=True)
        raise OSError(getattr(error, "errno", None), f"cannot write {what} ({plain_reason(error)}); earlier "
                      f"checkpoints are intact; free some space and resume with --init_from", save_dir) from None


# What TensorFlow wraps an op's error in: "{{function_node __wrapped__SaveV2_...}} <file>; <cause> [Op:SaveV2]".
_TF_FUNCTION_NODE = re.compile(r"\{\{function_node [^}]*\}\}\s*")
_TF_OP_NAME = re.compile(r"\s*\[Op:[^\]]*\]\s*$")


def plain_reason(error):
    """The cause of a failed write in plain words ("No space left on device"): an OSError's strerror, or a
    TensorFlow error's first line without TensorFlow's function name, op name and temporary file name."""
    if getattr(error, "strerror", None):
        return error.strerror
    message = (getattr(error, "message", None) or str(error)).strip()
    line = _TF_OP_NAME.sub("", _TF_FUNCTION_NODE.sub("", message.splitlines()[0] if message else ""))
    # TensorFlow names a failed file as "<its path>; <cause>": the path is a temporary file of the save dir.
    return line.rsplit("; ", 1)[-1].strip() or error.__class__.__name__


def save_best(save_dir, checkpoint, step, config, vocab, unk_token, info):
    """Replace save_dir/best with the current weights and their model_info.yaml, crash-safely.

    Everything is written into best.new/ first, then renamed over best/: after a kill, best/ (or, for the
    instant between the two renames, best.old/, which recover_best puts back) always holds a complete set.
    """
    best, new, old = (os.path.join(save_dir, BEST_DIR + suffix) for suffix in ("", ".new", ".old"))
    shutil.rmtree(new, ignore_errors=True)
    os.makedirs(new)
    tf.train.CheckpointManager(checkpoint, new, max_to_keep=1,
                               checkpoint_name=checkpoints.CHECKPOINT_NAME).save(step)
    write_config(new, config)
    write_vocab(new, vocab, unk_token)
    write_yaml(os.path.join(new, MODEL_INFO_FILE), info)
    _fsync_dir(new)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(best):
        os.rename(best, old)
    os.rename(new, best)
    _fsync_dir(save_dir)
    shutil.rmtree(old, ignore_errors=True)


def recover_best(save_dir):
    """Finish or undo a best/ swap that a kill interrupted."""
    best, new, old = (os.path.join(save_dir, BEST_DIR + suffix) for suffix in ("", ".new", ".old"))
    if not os.path.isdir(best) and os.path.isdir(old):
        os.rename(old, best)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def remove_unfinished_checkpoints(save_dir):
    """Remove the model.ckpt-<step>_temp/ folders a save killed mid-write left (TensorFlow writes a checkpoint
    there and renames its files out at the end), saying so in one line. Only the holder of the lock may: another
    trainer could be writing one."""
    pattern = os.path.join(glob.escape(save_dir), checkpoints.CHECKPOINT_NAME + "-*_temp")
    leftovers = sorted(path for path in glob.glob(pattern) if os.path.isdir(path))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    if leftovers:
        print(f"removed {', '.join(os.path.basename(path) for path in leftovers)} from {save_dir}: the unfinished "
              f"checkpoint of a save that was interrupted", file=sys.stderr)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------
# The lock and loading


class SaveDir:
    """A save dir as one training run writes it: the lock, config.yaml and vocab.json, checkpoints with best/,
    metrics.csv and the TensorBoard logs. `with SaveDir(path, log_dir) as save_dir:` holds the lock, so that a
    second trainer on the same dir is refused."""

    def __init__(self, path, log_dir=None):
        self.path = path
        self.log_dir = log_dir or os.path.join(path, LOG_DIR)
        self.settings = self.vocab = self.unk_token = None
        self.checkpoint = self.manager = self.metrics = None
        self.saved_step = 0  # the step of this dir's newest checkpoint (0: none yet)
        self._lock = None

    def __enter__(self):
        os.makedirs(self.path, exist_ok=True)
        self._lock = open(os.path.join(self.path, LOCK_FILE), "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._lock.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ValueError(f"another train.py is already training in {self.path}; "
                                 f"wait for it to finish or use another --save_dir")
            raise
        return self

    def __exit__(self, *exc_info):
        self._lock.close()

    def prepare(self, settings, vocab, unk_token, resuming_here):
        """Check that this run may write here, finish a best/ swap a kill interrupted, remove the unfinished
        checkpoints of an interrupted save, write config.yaml and vocab.json, and make the log dir (an unusable
        --log_dir fails now, not at the first step).

        Raises ValueError before anything is written when the run would overwrite another model.
        """
        if not resuming_here and checkpoints.has_checkpoint(self.path):
            raise ValueError(f"{self.path} already holds a trained model; resume it with --init_from "
                             f"{self.path}, or give another --save_dir")
        os.makedirs(self.path, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        recover_best(self.path)
        remove_unfinished_checkpoints(self.path)
        self.settings, self.vocab, self.unk_token = settings, vocab, unk_token
        write_config(self.path, settings)
        write_vocab(self.path, vocab, unk_token)

    def attach(self, checkpoint):
        """Save `checkpoint` (weights, optimizer, counters) here from now on; open the metrics."""
        self.checkpoint = checkpoint
        self.manager = checkpoints.checkpoint_manager(checkpoint, self.path)
        self.metrics = MetricsLog(self.path, self.log_dir)

    def restore(self, checkpoint, directory):
        """Restore the newest intact, finite checkpoint of `directory` (this dir or another) into `checkpoint`.

        Metrics rows after it (steps the run will replay) are dropped. Returns (path, the elapsed_s it was made at).
        """
        path = checkpoints.restore_newest(checkpoint, directory)
        checkpoints.check_finite(checkpoint.model, path)
        step = checkpoints.checkpoint_step(path)
        if os.path.abspath(directory) == os.path.abspath(self.path):
            self.saved_step = step
        keep_samples_until(os.path.join(self.path, SAMPLES_FILE), step)
        return path, self.metrics.keep_until(step)

    def write_sample(self, step, temperature, seed, text):
        """Append one sample made while training to samples.txt, under its SAMPLE_HEADER, and to TensorBoard."""
        header = SAMPLE_HEADER.format(step=step, temperature=temperature, seed=seed)
        with writing(self.path, SAMPLES_FILE), open(os.path.join(self.path, SAMPLES_FILE), "a",
                                                     encoding="utf-8") as f:
            f.write(f"{header}\n{text}\n\n")
        self.metrics.write_text(f"sample/temperature_{temperature:g}", text, step)

    def best_score(self):
        """The score best/ was saved with, or None when there is no best/ yet."""
        info = os.path.join(self.path, BEST_DIR, MODEL_INFO_FILE)
        return float(read_yaml(info).get("score", math.inf)) if os.path.isfile(info) else None

    def save(self, step, best_info=None):
        """Write checkpoint `step` and, with `best_info` (its model_info.yaml), replace best/ by it; returns the
        checkpoint's path. A failed write is one OSError (see writing); earlier checkpoints stay intact."""
        with writing(self.path, f"the checkpoint of step {step}"):
            if best_info is not None:
                save_best(self.path, self.checkpoint, step, self.settings, self.vocab, self.unk_token, best_info)
            path = self.manager.save(checkpoint_number=step)
        self.saved_step = step
        return path

    @property
    def latest_checkpoint(self):
        return self.manager.latest_checkpoint


class MetricsLog:
    """Loss curves: rows appended to save_dir/metrics.csv and, when tensorboard is installed, scalars."""

    def __init__(self, save_dir, log_dir):
        self.path = os.path.join(save_dir, METRICS_FILE)
        if not os.path.exists(self.path):
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(METRICS_COLUMNS)
        self.writer = None
        with contextlib.suppress(ImportError):
            import tensorboard  # noqa: F401  (tf.summary writes nothing useful without it)
            self.writer = tf.summary.create_file_writer(log_dir)

    def keep_until(self, step):
        """Drop the rows after `step` (steps a resume replays); returns the last kept row's elapsed_s (or 0)."""
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [row for row in rows if int(row["step"]) <= step]
        if len(kept) < len(rows):
            text = io.StringIO()
            writer = csv.DictWriter(text, METRICS_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_bytes(self.path, text.getvalue().encode("utf-8"))
        elapsed = [float(row["elapsed_s"]) for row in kept if row["elapsed_s"]]
        return elapsed[-1] if elapsed else 0.0

    def write(self, step, **values):
        """Append one row (missing columns stay empty) and the same scalars to TensorBoard."""
        row = {"step": step, **values}
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_csv_value(row.get(column)) for column in METRICS_COLUMNS])
        if self.writer is not None:
            with self.writer.as_default():
                for name, value in values.items():
                    if name not in ("epoch", "elapsed_s") and value is not None:
                        tf.summary.scalar(name, value, step=step)
            self.writer.flush()

    def write_text(self, name, text, step):
        """A text at `step` in TensorBoard (as a code block: TensorBoard reads text as Markdown)."""
        if self.writer is not None:
            with self.writer.as_default():
                tf.summary.text(name, f"```\n{text}\n```", step=step)
            self.writer.flush()


def keep_samples_until(path, step):
    """Drop the samples of samples.txt made after `step` (steps a resume replays)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    later = next((match.start() for match in SAMPLE_HEADER_STEP.finditer(text) if int(match.group(1)) > step), None)
    if later is not None:
        atomic_write_bytes(path, text[:later].encode("utf-8"))


def _csv_value(value):
    return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else value)


def build_model(config, random_init=True):
    """Create the CharRNN a ModelConfig (or a config.yaml's settings) describes, with all its weights built
    (random_init=False: as zeros, for weights restored next)."""
    model = CharRNN(config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config),
                    random_init=random_init)
    model.build_weights()
    return model


@dataclasses.dataclass(frozen=True)
class Loaded(Saved):
    """A model restored for inference: a save dir's Saved settings, its model (the CharRNN) and its checkpoint's
    path."""
    model: CharRNN
    path: str


def load(save_dir):
    """Restore the newest intact checkpoint of a save dir for sampling; returns a Loaded.

    Raises FileNotFoundError (no save dir, no checkpoint) or ValueError (damaged files), never returns
    random weights.
    """
    if not os.path.isdir(save_dir):
        raise FileNotFoundError(f"save dir {save_dir} does not exist: train a model first or give --save_dir")
    saved = read_saved(save_dir)
    if len(saved.vocab) != saved.model_config.vocab_size:
        raise ValueError(f"{save_dir}: vocab.json has {len(saved.vocab)} tokens but config.yaml says "
                         f"{saved.model_config.vocab_size}; the save dir is damaged")
    model = build_model(saved.model_config, random_init=False)  # the checkpoint's weights replace them
    path = checkpoints.restore_newest(tf.train.Checkpoint(model=model), save_dir)
    checkpoints.check_finite(model, path)
    return Loaded(saved.train_config, saved.model_config, saved.vocab, saved.unk_token, model, path)
