"""What the libraries and the scripts share about the running process, without TensorFlow or argparse: the exit
codes it ends with (README: Exit codes), the range of float32, in which TensorFlow computes, and one-line warnings."""
import math
import sys

EXIT_USAGE = 2  # something given is wrong: a flag value, a prime, what a file holds, an incompatible resume
EXIT_FAILURE = 1  # something missing or that cannot be written: no text, no checkpoint, a full disk; a NaN loss
EXIT_INTERRUPTED = 130  # Ctrl-C

# A value outside float32's normal range would become 0 or infinity in TensorFlow.
FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


def in_float32_range(value):
    """True for a number > 0 that float32 holds as a normal number (not rounded to 0, not overflowing)."""
    return math.isfinite(value) and FLOAT32_TINY <= value <= FLOAT32_MAX


def warn(message):
    """Print a one-line warning on stderr."""
    print(f"warning: {message}", file=sys.stderr)
