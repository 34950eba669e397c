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

from runtime import FLOAT32_MAX, FLOAT32_TINY, in_float32_range

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
    seed: int | None = None
    # Devices and machines (distribution.py)
    strategy: str = "auto"
    replicas: int = 0
    cluster_timeout: float = 300.0  # seconds a multi_worker worker waits for the others to start
    # The preset whose settings the run took (PRESETS), recorded in config.yaml
    preset: str | None = None


TRAIN_DEFAULTS = TrainConfig()


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
MAX_N = 2 ** 30  # the generator counts tokens in int32
MAX_BEAM_WIDTH = 1024  # each step keeps width x vocabulary candidates
# The longest prime the server takes by default (--max_prime) and sample.py -i takes: feeding a prime is one step
# per token, so a 1 MB line would keep the loop busy for most of a minute.
MAX_PRIME = 1000
MODE_ARGMAX, MODE_SAMPLE, MODE_SAMPLE_ON_SPACES = 0, 1, 2
SAMPLE_MODES = {MODE_ARGMAX: "argmax", MODE_SAMPLE: "sample", MODE_SAMPLE_ON_SPACES: "sample after spaces"}


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """One sample: the prime, then n tokens chosen by `mode` (SAMPLE_MODES) from the logits divided by
    `temperature`, among the top_k likeliest (0: all) and among the likeliest whose probabilities add up to top_p
    (1: all), repeatably for a seed (None: a random one). The defaults are sample.py's."""
    prime: str = "The"
    n: int = 500
    mode: int = MODE_SAMPLE
    temperature: float = 1.0
    seed: int | None = None
    top_k: int = 0
    top_p: float = 1.0


def check_settings(settings):
    """Raise ValueError with a one-line reason when a sampling setting is out of range (no model needed, so that
    sample.py checks its flags before TensorFlow loads)."""
    n, mode, temperature, seed, top_k = settings.n, settings.mode, settings.temperature, settings.seed, settings.top_k
    top_p = settings.top_p
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= MAX_N:
        raise ValueError(f"n must be an integer from 0 to {MAX_N}, got {n!r}")
    if mode not in SAMPLE_MODES:
        modes = ", ".join(f"{number} ({name})" for number, name in SAMPLE_MODES.items())
        raise ValueError(f"sample mode must be one of {modes}, got {mode!r}")
    if not (isinstance(temperature, (int, float)) and in_float32_range(temperature)):
        raise ValueError(f"temperature must be a number from {FLOAT32_TINY:.2g} to {FLOAT32_MAX:.2g}, "
                         f"got {temperature!r}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    if not 0 <= top_k <= MAX_N:  # top_k goes to the generator as int32, which would wrap larger values
        raise ValueError(f"top_k must be an integer from 0 to {MAX_N} (0 keeps every token), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and FLOAT32_TINY <= top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (1 keeps every token), got {top_p!r}")


def check_stops(stops):
    """Raise ValueError when a stop string is empty (or not a string): it would end every sample at once."""
    if any(not isinstance(stop, str) or not stop for stop in stops):
        raise ValueError("a stop string must not be empty")


def check_beam_width(width):
    """Raise ValueError unless the beam width is an integer from 1 to MAX_BEAM_WIDTH."""
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_BEAM_WIDTH:
        raise ValueError(f"the beam width must be an integer from 1 to {MAX_BEAM_WIDTH}, got {width!r}")
