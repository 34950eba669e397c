"""The settings of a run, typed, each default stated once (no TensorFlow here, so `train.py --help` stays fast).

TrainConfig: every train.py flag with its default; the parser takes its defaults from here.
ModelConfig: what builds the network. train.py writes it into config.yaml (beside the training flags) and
whoever loads a save dir reads it back by name: `CharRNN(ModelConfig.from_dict(saved))`.
"""
import dataclasses
import os

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
