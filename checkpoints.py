"""A directory's TensorFlow checkpoints (model.ckpt-<step>): found newest first, the newest intact one restored
(a damaged one skipped with a warning), weights that are not finite refused, and the manager that writes them."""
import contextlib
import glob
import os
import re

import numpy as np
import tensorflow as tf

from runtime import warn

CHECKPOINT_NAME = "model.ckpt"
MAX_TO_KEEP = 5  # checkpoints kept in a save dir; older ones are the fallback for a damaged newest one
_STEP_FROM_PATH = re.compile(r"-(\d+)$")


def has_checkpoint(directory):
    """True when a directory holds at least one checkpoint index file."""
    return bool(glob.glob(os.path.join(directory, CHECKPOINT_NAME + "-*.index")))


def checkpoint_paths(directory):
    """Checkpoint prefixes in a directory, newest first (the `checkpoint` file first, then any others)."""
    listed = []
    state = None
    with contextlib.suppress(tf.errors.OpError, ValueError):
        state = tf.train.get_checkpoint_state(directory)
    if state is not None:
        listed = [os.path.join(directory, os.path.basename(p)) for p in state.all_model_checkpoint_paths]
    found = [p[:-len(".index")] for p in glob.glob(os.path.join(directory, CHECKPOINT_NAME + "-*.index"))]
    paths = {p for p in listed + found if os.path.exists(p + ".index")}
    return sorted(paths, key=checkpoint_step, reverse=True)


def _listed_but_missing(directory, paths):
    """Checkpoints the `checkpoint` index names, newer than the newest usable one, whose .index file is gone."""
    state = None
    with contextlib.suppress(tf.errors.OpError, ValueError):
        state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return []
    newest = checkpoint_step(paths[0]) if paths else -1
    listed = [os.path.join(directory, os.path.basename(p)) for p in state.all_model_checkpoint_paths]
    return [p for p in listed if checkpoint_step(p) > newest and not os.path.exists(p + ".index")]


def checkpoint_step(path):
    """The step number in a checkpoint prefix such as save/model.ckpt-1000."""
    match = _STEP_FROM_PATH.search(path)
    return int(match.group(1)) if match else -1


def restore_newest(checkpoint, directory):
    """Restore the newest intact checkpoint of `directory` into `checkpoint`; return its path.

    A damaged newest checkpoint is skipped with a warning. Raises FileNotFoundError when none is usable.
    """
    paths = checkpoint_paths(directory)
    for missing in _listed_but_missing(directory, paths):
        warn(f"checkpoint {missing} is listed in {directory}/checkpoint but its .index file is missing; "
             f"using the newest one left")
    if not paths:
        raise FileNotFoundError(f"no checkpoint in {directory}: train a model there first with "
                                f"`python train.py --save_dir {directory}`")
    for path in paths:
        try:
            # Every variable that exists here must get a value; values the file has beyond them (the
            # optimizer's, when only the model is restored) are expected.
            checkpoint.read(path).assert_existing_objects_matched().expect_partial()
            return path
        except (tf.errors.OpError, ValueError, AssertionError, IndexError) as e:  # IndexError: a truncated file
            warn(f"checkpoint {path} is damaged ({e.__class__.__name__}); trying the one before it")
    raise FileNotFoundError(f"every checkpoint in {directory} is damaged; retrain, or resume from a copy")


def weights_finite(model):
    """True when every weight of the model is a finite number. Read in numpy: an eager op or two a weight took a
    one-off sample.py 11 ms, numpy 4 ms."""
    return all(np.isfinite(weight.numpy()).all() for weight in model.weights)


def check_finite(model, path):
    """Raise ValueError when the weights restored from checkpoint `path` hold NaN or infinity."""
    if not weights_finite(model):
        raise ValueError(f"checkpoint {path} holds NaN or infinite weights (the training diverged): "
                         f"use an earlier checkpoint or retrain with a lower --learning_rate")


def checkpoint_manager(checkpoint, directory):
    """A CheckpointManager writing model.ckpt-<step> files with relative paths into `directory`."""
    return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=MAX_TO_KEEP,
                                      checkpoint_name=CHECKPOINT_NAME)
