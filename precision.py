"""Training precision: float32, or bfloat16 matrix products with float32 weights, optimizer, loss and state.

`choose(requested, rnn_size)` turns train.py's --precision (auto, float32, bfloat16) into what runs, with a reason
for the log line. auto picks bfloat16 only on a CPU whose flags say it multiplies bfloat16 in hardware (AVX-512 BF16
or AMX) and only for layers of at least AUTO_MIN_RNN_SIZE units: measured with bench/speed.py on such a CPU
(docs/performance.md, "bfloat16"), training ran about twice as fast in bfloat16 at 2 x 512, 1.45x at 2 x 256 and
1.22x at the default 3 x 128 (each the quietest of three runs); smaller layers were not measured, and there the
casts around products of 50 rows by fewer than 128 columns weigh more. A rule, not a
timing at start-up: two compiled training steps would cost the start-up tens of seconds, and the rule gives the
same answer on the same machine every time. On a GPU, auto keeps float32 (no GPU was at hand to measure);
--precision bfloat16 runs the Keras layers under Keras' "mixed_bfloat16" policy there (not tested on a GPU).

Checkpoints hold float32 weights whatever the precision, so a run resumes in either. No TensorFlow at import.
"""
import functools

FLOAT32, BFLOAT16 = "float32", "bfloat16"
PRECISIONS = ("auto", FLOAT32, BFLOAT16)
# /proc/cpuinfo flags of the x86 extensions that multiply bfloat16 in hardware (Intel Cooper Lake and later,
# AMD Zen 4 and later; AMX: Intel Sapphire Rapids and later).
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
AUTO_MIN_RNN_SIZE = 128  # the smallest layer size auto trains in bfloat16 (see the module doc)
CPUINFO = "/proc/cpuinfo"


@functools.cache
def cpu_bfloat16_flags(cpuinfo=CPUINFO):
    """The BFLOAT16_CPU_FLAGS that this CPU has (empty where /proc/cpuinfo is missing, as off Linux)."""
    try:
        with open(cpuinfo) as f:
            flags = set()
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.partition(":")[2].split())
    except OSError:
        return ()
    return tuple(flag for flag in BFLOAT16_CPU_FLAGS if flag in flags)


def choose(requested, rnn_size, on_gpu=False, cpu_flags=None):
    """(the precision that runs, why) for --precision `requested` at layers of `rnn_size` units.

    cpu_flags: the CPU's BFLOAT16_CPU_FLAGS (default: this machine's)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested, "as asked"
    if on_gpu:
        return FLOAT32, "auto: bfloat16 is not measured on GPUs here; give --precision bfloat16 to try it"
    flags = cpu_bfloat16_flags() if cpu_flags is None else cpu_flags
    if not flags:
        return FLOAT32, f"auto: this CPU has none of {', '.join(BFLOAT16_CPU_FLAGS)}"
    if rnn_size < AUTO_MIN_RNN_SIZE:
        return FLOAT32, f"auto: layers of {rnn_size} units are below the {AUTO_MIN_RNN_SIZE} that gain from bfloat16"
    return BFLOAT16, f"auto: this CPU has {', '.join(flags)} and the layers have {rnn_size} units"


def keras_policy(precision):
    """The Keras dtype policy of the recurrent layers for `precision`."""
    return "mixed_bfloat16" if precision == BFLOAT16 else FLOAT32
