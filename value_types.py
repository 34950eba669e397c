"""The value types of flags and request parameters: text -> a checked number, or argparse.ArgumentTypeError naming
what was expected. Used by the scripts' parsers (through cli.py) and by the declaration of the sampling settings
(settings.py), which the server's request parsing reads too; no TensorFlow."""
import argparse

from runtime import FLOAT32_TINY, in_float32_range


def number_type(kind, check, description):
    """A flag type: text -> kind(text), refused (naming `description`) when it does not parse or check(value) is
    false. The server's flags make their own (sample_server.py)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {description}")
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {description}")
        return value
    parse.__name__ = description  # argparse names the type in its messages
    return parse


non_negative_int = number_type(int, lambda v: v >= 0, "a non-negative integer")
positive_int = number_type(int, lambda v: v > 0, "a positive integer")
positive_float = number_type(float, in_float32_range, "a positive number (1.2e-38 to 3.4e+38)")
sample_every = number_type(int, lambda v: v >= -1, "-1 (no samples), 0 (at each checkpoint) or a number of steps")
fraction = number_type(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
weight_decay = number_type(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
probability = number_type(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")
# float32 rounds numbers below 1.2e-38 to 0: the smallest top_p is the smallest normal float32.
top_p = number_type(float, lambda v: FLOAT32_TINY <= v <= 1, "a probability in (0, 1]")
