"""The settings of a run, typed, each default stated once (no TensorFlow here, so `train.py --help` stays fast).

TrainConfig: every train.py flag with its default; the parser takes its defaults from here.
ModelConfig: what builds the network. train.py writes it into config.yaml (beside the training flags) and
whoever loads a save dir reads it back by name: `CharRNN(ModelConfig.from_dict(saved))`.
SampleSettings: one sample's settings; the sampling limits and check_settings (with check_stops and
check_beam_width) need no model, so sample.py refuses a bad flag with them before TensorFlow loads.
"""
import dataclasses
import numbers
import os
import secrets

import value_types
from runtime import FLOAT32_MAX, FLOAT32_TINY

DEFAULT_DATA_DIR = os.path.join("data", "tinyshakespeare")
CELL_TYPES = ("lstm", "gru", "rnn")
STRATEGIES = ("auto", "one", "mirrored", "multi_worker")  # distribution.py says what each means


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every train.py flag; `python train.py --help` says what each means."""
    # Data
    data_dir: str = DEFAULT_DATA_DIR
    word_level: bool = False
    val_frac: float = 0.05
    encoding: str = "utf-8"
    max_vocab: int = 0
    min_count: int = 1
    data_url: str | None = None
    keep_crlf: bool = False
    cache_dir: str | None = None
    # Saving and resuming
    save_dir: str = "save"
    save_every: int = 1000
    init_from: str | None = None
    print_every: int = 10
    log_dir: str | None = None
    # Samples while training (train_samples.py): every sample_every steps (0: at each checkpoint; -1: none), from
    # the empty prime, at each of the comma-separated temperatures, with one seed at every step
    sample_every: int = 0
    sample_length: int = 200
    sample_temperatures: str = "0.5,1.0"
    sample_seed: int = 0
    # Model
    model: str = "lstm"
    rnn_size: int = 128
    num_layers: int = 3
    dropout: float = 0.0
    word2vec_embedding: str | None = None
    # Optimization
    batch_size: int = 50
    seq_length: int = 50
    num_epochs: int = 50
    max_steps: int = 0
    grad_clip: float = 5.0
    learning_rate: float = 0.002
    decay_rate: float = 0.97
    weight_decay: float = 0.0  # decoupled (AdamW's): each step shrinks every weight by learning rate x weight_decay
    seed: int | None = None
    # Devices and machines (distribution.py)
    strategy: str = "auto"
    replicas: int = 0
    cluster_timeout: float = 300.0  # seconds a multi_worker worker waits for the others to start
    # auto, float32 or bfloat16 (precision.py); config.yaml records the one that ran. Not resumed: the weights are
    # float32 in either, so a run resumes in the other.
    precision: str = "auto"
    # The preset whose settings the run took (PRESETS), recorded in config.yaml
    preset: str | None = None


TRAIN_DEFAULTS = TrainConfig()


def parse_temperatures(text):
    """--sample_temperatures "0.5,1.0" -> (0.5, 1.0); ValueError for anything but positive numbers."""
    try:
        temperatures = tuple(float(value) for value in text.split(","))
    except ValueError:
        temperatures = ()
    if not temperatures or not all(FLOAT32_TINY <= value <= FLOAT32_MAX for value in temperatures):
        raise ValueError(f"--sample_temperatures {text!r}: give positive numbers separated by commas, as 0.5,1.0 "
                         f"({FLOAT32_TINY:.2g} to {FLOAT32_MAX:.2g})")
    return temperatures


@dataclasses.dataclass(frozen=True)
class Preset:
    """train.py --preset NAME: settings found by measurement for a time budget on a 2-core CPU (README: Presets).
    Flags given beside the preset override its settings; the rest keep TrainConfig's defaults."""
    summary: str
    settings: dict


PRESETS = {
    "fast": Preset(
        "1.575 nats/char on tinyshakespeare in 2.5 minutes on 2 CPU cores",
        {"num_layers": 2, "rnn_size": 256, "num_epochs": 2, "learning_rate": 0.004, "decay_rate": 0.7}),
    "best": Preset(
        "1.431 nats/char in 38 minutes on 2 CPU cores; longer runs of this size overfit",
        {"num_layers": 2, "rnn_size": 512, "dropout": 0.3, "num_epochs": 8, "learning_rate": 0.002,
         "decay_rate": 0.8}),
    "hour": Preset(
        "1.421 nats/char in 25 minutes on 2 CPU cores with bfloat16 (about twice that in float32); more epochs "
        "overfit",
        {"num_layers": 3, "rnn_size": 512, "dropout": 0.4, "num_epochs": 16, "learning_rate": 0.002,
         "decay_rate": 0.9, "weight_decay": 0.1}),
}
for _preset in PRESETS.values():  # a preset names train.py flags only
    TrainConfig(**_preset.settings)

# Settings that a resume takes from the checkpoint's config.yaml unless given on the command line: they shape
# the weights or the vocabulary.
RESUMED_SETTINGS = ("model", "rnn_size", "num_layers", "dropout", "word_level", "encoding", "max_vocab",
                    "min_count", "keep_crlf")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network: vocabulary size, cell type, layers and their size, embedding size, dropout probability."""
    vocab_size: int
    model: str = TRAIN_DEFAULTS.model
    rnn_size: int = TRAIN_DEFAULTS.rnn_size
    num_layers: int = TRAIN_DEFAULTS.num_layers
    embedding_size: int | None = None  # None: rnn_size
    dropout: float = TRAIN_DEFAULTS.dropout

    def __post_init__(self):
        if self.model not in CELL_TYPES:
            raise ValueError(f"unknown model type {self.model!r}: choose one of {', '.join(CELL_TYPES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} is not a probability in [0, 1)")
        if self.embedding_size is None:
            object.__setattr__(self, "embedding_size", self.rnn_size)

    @classmethod
    def from_dict(cls, saved):
        """The model settings among a config.yaml's entries (which hold the training flags too)."""
        return cls(**{field.name: saved[field.name] for field in dataclasses.fields(cls) if field.name in saved})

    def to_dict(self):
        return dataclasses.asdict(self)


# Sampling: the modes of sample.py's --sample and the server's sample_mode, and what one sample is asked for.
MAX_SEED = 2 ** 63 - 1
# A seed picked for a run or a sample asked without one (train.py, sample.py, -i, the server) is below this: short
# to read and send back. The draw uses the low 32 bits of a seed anyway (philox.py), so larger picks would add nothing.
PICKED_SEEDS = 2 ** 31
MAX_N = 2 ** 30  # the generator counts tokens in int32
MAX_BEAM_WIDTH = 1024  # each step keeps width x vocabulary candidates
# The longest prime the server takes by default (--max_prime) and sample.py -i takes: feeding a prime is one step
# per token, so a 1 MB line would keep the loop busy for most of a minute.
MAX_PRIME = 1000
MODE_ARGMAX, MODE_SAMPLE, MODE_SAMPLE_ON_SPACES = 0, 1, 2
# The frequency and presence penalties' range, and the most likeliest alternatives reported per token: OpenAI's.
MAX_PENALTY = 2.0
MAX_LOGPROBS = 5
SAMPLE_MODES = {MODE_ARGMAX: "argmax", MODE_SAMPLE: "sample", MODE_SAMPLE_ON_SPACES: "sample after spaces"}


def pick_seed():
    """A random seed in [0, PICKED_SEEDS), for a training run or a sample asked without one."""
    return secrets.randbelow(PICKED_SEEDS)


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """One sample: the prime, then n tokens chosen by `mode` (SAMPLE_MODES) from the logits divided by
    `temperature`, among the top_k likeliest (0: all) and among the likeliest whose probabilities add up to top_p
    (1: all), repeatably for a seed (None: a random one); each logit first lowered for the tokens already
    generated (frequency_penalty per time, presence_penalty once); with logprobs > 0, each token's log-probability
    and that many likeliest alternatives are reported. The defaults are sample.py's."""
    prime: str = "The"
    n: int = 500
    mode: int = MODE_SAMPLE
    temperature: float = 1.0
    seed: int | None = None
    top_k: int = 0
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int = 0


@dataclasses.dataclass(frozen=True)
class Setting:
    """The declaration of one sampling setting, from which every surface takes it: sample.py's flag, -i's
    :command, the server's query parameter and JSON field (with their 400 reasons), the JSON answers, the web
    page's field (GET /settings serves these), the check of a request and the export's signature.

    name: the SampleSettings field; kind: int, float or str; default: sample.py's (SampleSettings'); low, high:
    the inclusive limits (None: none), or choices: the values allowed, with their meanings; flag: sample.py's;
    http: the query parameter and JSON field (also the export's input); parse: reads a flag or a query value
    (argparse's type); what: what the check says a value must be; query_what: what a query value must be, where
    it says more than `what`; served: the server's default where it is not sample.py's (the original server's);
    dtype: the generator's tensor type of the setting (None: not a tensor: the prime, and logprobs, which picks
    the variant of the compiled block rather than reaching it per row).
    """
    name: str
    kind: type
    help: str
    flag: str
    http: str
    parse: object
    what: str = ""
    low: object = None
    high: object = None
    choices: dict | None = None
    query_what: str | None = None
    served: object = None  # None: sample.py's default
    dtype: str | None = None

    @property
    def default(self):
        return getattr(SampleSettings, self.name)

    @property
    def served_default(self):
        return self.default if self.served is None else self.served

    def valid(self, value):
        """Whether the check takes this value (None is a random seed)."""
        if self.name == "seed" and value is None:
            return True
        if self.choices is not None:
            return value in self.choices
        if self.kind is str:
            return isinstance(value, str)
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not (integral if self.kind is int else isinstance(value, (int, float))):
            return False
        return self.low <= value <= self.high

    def reason(self):
        """What a value must be, as the check words it (without the value it got)."""
        return f"{self.http} must be {self.what}"

    def describe(self):
        """The declaration as JSON (GET /settings; the web page builds its form from it)."""
        return {"name": self.http, "type": self.kind.__name__, "default": self.served_default, "low": self.low,
                "high": self.high, "help": self.help, "flag": self.flag,
                "choices": None if self.choices is None else {str(k): v for k, v in self.choices.items()}}


_PENALTY_WHAT = f"a number from {-MAX_PENALTY:g} to {MAX_PENALTY:g}"
_penalty = value_types.number_type(float, lambda v: -MAX_PENALTY <= v <= MAX_PENALTY, _PENALTY_WHAT)
_MODES = ", ".join(f"{number} ({name})" for number, name in SAMPLE_MODES.items())
# Every sampling setting, in the order of the server's parameters, the check and the JSON answers.
SETTINGS = (
    Setting("prime", str, "prime text fed to the network first; empty: start as if at a new line", "--prime",
            "prime", str, served="The "),
    Setting("n", int, "number of tokens (characters, or words at word level) to sample", "-n", "n",
            value_types.non_negative_int, f"an integer from 0 to {MAX_N}", 0, MAX_N, served=200, dtype="int32"),
    Setting("mode", int, "0 to use argmax at each timestep, 1 to sample at each timestep, 2 to sample only after a "
            "space (argmax elsewhere; at word level the same as 1)", "--sample", "sample_mode", int,
            f"one of {_MODES}", choices=SAMPLE_MODES, served=MODE_SAMPLE_ON_SPACES, dtype="int32"),
    Setting("temperature", float, "divides the logits: below 1 more conservative, above 1 more varied; any value > 0 "
            "that float32 holds (1.2e-38 to 3.4e+38)", "--temperature", "temperature", value_types.positive_float,
            f"a number from {FLOAT32_TINY:.2g} to {FLOAT32_MAX:.2g}", FLOAT32_TINY, FLOAT32_MAX,
            query_what="a finite number > 0 (1.2e-38 to 3.4e+38)", served=0.8, dtype="float32"),
    Setting("seed", int, "random seed, for repeatable output (default: a random one)", "--seed", "seed",
            value_types.non_negative_int, f"an integer in [0, {MAX_SEED}]", 0, MAX_SEED, dtype="int64"),
    # top_k goes to the generator as int32, which would wrap values above MAX_N.
    Setting("top_k", int, "sample only among the k likeliest tokens (0: all)", "--top_k", "top_k",
            value_types.non_negative_int, f"an integer from 0 to {MAX_N} "
            "(0 keeps every token)", 0, MAX_N, dtype="int32"),
    Setting("top_p", float, "nucleus sampling: only among the fewest likeliest tokens whose probabilities add up to "
            "at least p (1: all); after --temperature and --top_k", "--top_p", "top_p", value_types.top_p,
            "a number in (0, 1] (1 keeps every token)", FLOAT32_TINY, 1.0, query_what="a number in (0, 1]",
            dtype="float32"),
    # OpenAI's penalties: counts over the tokens generated so far by the sample (not the prime), in every mode.
    Setting("frequency_penalty", float, "lowers each token's logit by this much per time it was generated so far "
            "(not counting the prime; negative: raises it); before --temperature, --top_k and --top_p",
            "--frequency_penalty", "frequency_penalty", _penalty, _PENALTY_WHAT, -MAX_PENALTY,
            MAX_PENALTY, dtype="float32"),
    Setting("presence_penalty", float, "lowers the logit of each token generated at least once so far by this "
            "much (not counting the prime; negative: raises it)", "--presence_penalty", "presence_penalty",
            _penalty, _PENALTY_WHAT, -MAX_PENALTY, MAX_PENALTY, dtype="float32"),
    Setting("logprobs", int, "report each generated token's log-probability (the model's own, at temperature 1, "
            f"before the penalties, top-k and top-p) and that many likeliest alternatives (0: none; at most "
            f"{MAX_LOGPROBS})", "--logprobs", "logprobs", value_types.non_negative_int,
            f"an integer from 0 to {MAX_LOGPROBS}", 0, MAX_LOGPROBS),
)
SETTINGS_BY_HTTP = {setting.http: setting for setting in SETTINGS}
CHECKED = tuple(setting for setting in SETTINGS if setting.what)  # every setting but the prime, which any text is
# The settings that reach the generator as tensors, one value per row (the prime reaches it as ids).
ROW_SETTINGS = tuple(setting for setting in SETTINGS if setting.dtype is not None)


def check_settings(settings):
    """Raise ValueError with a one-line reason when a sampling setting is out of range (no model needed, so that
    sample.py checks its flags before TensorFlow loads). The settings are checked in SETTINGS' order."""
    for setting in CHECKED:
        value = getattr(settings, setting.name)
        if not setting.valid(value):
            raise ValueError(f"{setting.reason()}, got {value!r}")


def check_stops(stops):
    """Raise ValueError when a stop string is empty (or not a string): it would end every sample at once."""
    if any(not isinstance(stop, str) or not stop for stop in stops):
        raise ValueError("a stop string must not be empty")


def check_beam_width(width):
    """Raise ValueError unless the beam width is an integer from 1 to MAX_BEAM_WIDTH."""
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_BEAM_WIDTH:
        raise ValueError(f"the beam width must be an integer from 1 to {MAX_BEAM_WIDTH}, got {width!r}")


# ----------------------------------------------------------------------------------------------------------
# Analysis (analyze.py and the server's POST /analyze): what is shown of each position and of the cells

ANALYSIS_TOP = 5  # likeliest alternatives shown for each position (--top, the "top" field)
MAX_ANALYSIS_TOP = 20
ANALYSIS_CELLS = 10  # cells listed by how well they track a feature of the text (--cells, the "cells" field)
MAX_ANALYSIS_CELLS = 100
REPORT_MAX_TOKENS = 20000  # the HTML report (and the cells' activations) cover the first this many tokens
MAX_ANALYZE = 20000  # the server's default --max_analyze: the longest text POST /analyze takes, in characters
