"""What the scripts share: argparse value types (from value_types.py), quiet TensorFlow start-up, and turning errors into one line on
stderr with an exit code (runtime.py's, which the libraries take from there)."""
import os
import re
import sys

from runtime import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE
from settings import TRAIN_DEFAULTS

# The scripts' flag types, as cli.positive_int and the like.
from value_types import (  # noqa: F401
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    sample_every,
    top_p,
    weight_decay,
)


def add_model_flags(parser):
    """--save_dir and the old --word_level flag, for the scripts that load a trained model."""
    parser.add_argument("--save_dir", default=TRAIN_DEFAULTS.save_dir,
                        help="save dir written by train.py (SAVE_DIR/best for the best model)")
    parser.add_argument("--word_level", action="store_true",
                        help="accepted for compatibility: word or character level comes from the saved model")


def escaped_text(text):
    """A command-line string with the escapes \\n, \\r, \\t and \\\\ read as a line break, a carriage return, a tab
    and a backslash (so that --stop '\\n\\n' is a blank line); anything else is kept as it is."""
    return re.sub(r"\\([nrt\\])", lambda match: {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}[match.group(1)], text)


def use_compilation_cache():
    """Keep XLA's compiled programs on disk between runs, so that a one-off sample.py compiles its generator once
    per model shape, not once per run: $CHAR_RNN_XLA_CACHE, or xla/ in the user's cache dir ("off": no cache).
    Call before TensorFlow is imported; a dir that cannot be made is skipped."""
    directory = os.environ.get("CHAR_RNN_XLA_CACHE")
    if directory is None:
        import utils
        directory = os.path.join(utils.user_cache_dir(), "xla")
    if directory in ("", "off"):
        return
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return
    flags = os.environ.get("TF_XLA_FLAGS", "")
    if "tf_xla_persistent_cache_directory" not in flags:
        os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={directory}".strip()
    if not os.environ.get("CHAR_RNN_VERBOSE"):
        # Reading an entry, TensorFlow first tries it as text and logs an error before reading it as binary:
        # errors of TensorFlow's C++ log are hidden too (sample.py reports its own).
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


ONE_THREAD_PER_OP_CPUS = 2


def quiet_tensorflow(one_thread_per_op=False):
    """Import TensorFlow without its start-up chatter on stderr (oneDNN and CUDA notices).

    Its C++ logging ignores TF_CPP_MIN_LOG_LEVEL before absl is initialised, so stderr is pointed at
    /dev/null while TensorFlow loads and finds its devices; set CHAR_RNN_VERBOSE=1 to see the notices.
    one_thread_per_op: for training (see set_one_thread_per_op).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get("CHAR_RNN_VERBOSE"):
        import tensorflow
        if one_thread_per_op:
            set_one_thread_per_op(tensorflow)
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf
        tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    if one_thread_per_op:
        set_one_thread_per_op(tf)


def usable_cores():
    """The processors this process may run on."""
    return len(os.sched_getaffinity(0))


def set_one_thread_per_op(tf):
    """For training on a machine of at most ONE_THREAD_PER_OP_CPUS processors: run each op on one thread.

    The unrolled training graph (model.py) has many small independent ops, which TensorFlow already runs side by
    side; splitting each matrix product over the same two cores as well only adds hand-offs. Measured on a
    2-core machine: 1.1x the training speed at 3 x 128, 1.5x at 2 x 512. Sampling gains nothing from it and the
    server, with its concurrent requests, loses about a tenth, so only training asks for it.
    TF_NUM_INTRAOP_THREADS overrides it.
    """
    if "TF_NUM_INTRAOP_THREADS" in os.environ or usable_cores() > ONE_THREAD_PER_OP_CPUS:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already started (a caller that ran ops before): keep its setting
        pass


def fail(message, code):
    """Print one line on stderr and return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


def run(action):
    """Call action(); turn user errors into one line on stderr and an exit code instead of a traceback."""
    try:
        return action() or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as e:
        return fail(e, EXIT_USAGE)
    except (FileNotFoundError, NotADirectoryError, FloatingPointError) as e:
        return fail(e, EXIT_FAILURE)
    except OSError as e:
        return fail(f"{e.strerror or e}: {e.filename or ''}".rstrip(": "), EXIT_FAILURE)
