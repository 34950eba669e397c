"""Train a character- or word-level RNN language model on data_dir/input.txt.

usage: python train.py [--data_dir data/tinyshakespeare] [--save_dir save] [--model lstm] ...
       python train.py --init_from save        # resume where the run in save/ stopped
"""
import argparse
import os
import sys

import cli
from precision import AUTO_MIN_RNN_SIZE, PRECISIONS
from settings import (
    CELL_TYPES,
    PRESETS,
    RESUMED_SETTINGS,
    STRATEGIES,
    TRAIN_DEFAULTS as DEFAULTS,
    TrainConfig,
    parse_temperatures,
)

DESCRIPTION = "Train a multi-layer LSTM/GRU/RNN language model over characters or words."


def build_parser():
    """The command line: the original's flags, names and defaults, plus a few new ones."""
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULTS.preset,
                        help="settings measured for a time budget, recorded in config.yaml; flags given beside it "
                             "override its settings. " + "; ".join(
                                 f"{name}: {preset.summary} ({preset_flags(preset)})"
                                 for name, preset in PRESETS.items()).replace("%", "%%"))
    data = parser.add_argument_group("data")
    data.add_argument("--data_dir", default=DEFAULTS.data_dir,
                      help="directory containing input.txt (the default corpus is downloaded when missing)")
    data.add_argument("--word_level", action="store_true",
                      help="split the text into words (on whitespace, keeping line breaks) instead of characters")
    data.add_argument("--val_frac", type=cli.fraction, default=DEFAULTS.val_frac,
                      help="fraction of the tokens (the contiguous tail) held out for validation; 0 for none")
    data.add_argument("--encoding", default=DEFAULTS.encoding, help="text encoding of input.txt")
    data.add_argument("--max_vocab", type=cli.non_negative_int, default=DEFAULTS.max_vocab,
                      help="keep only the N most frequent tokens, others become <unk> (0: keep all)")
    data.add_argument("--min_count", type=cli.positive_int, default=DEFAULTS.min_count,
                      help="tokens seen fewer times become <unk>")
    data.add_argument("--data_url", default=DEFAULTS.data_url,
                      help="mirror (URL or file path) of the default corpus; also $CHAR_RNN_DATA_URL")
    data.add_argument("--keep_crlf", action="store_true",
                      help="keep CRLF line endings as two characters (by default they become LF, in training "
                           "and in the primes and texts given to the model later)")
    data.add_argument("--cache_dir", default=DEFAULTS.cache_dir,
                      help="where to keep the preprocessing cache (default: beside input.txt, or "
                           "$XDG_CACHE_HOME/char-rnn when the data dir cannot be written)")

    io = parser.add_argument_group("saving and resuming")
    io.add_argument("--save_dir", default=DEFAULTS.save_dir, help="directory for checkpoints; the best model goes to "
                    "SAVE_DIR/best (lowest validation loss)")
    io.add_argument("--save_every", type=cli.positive_int, default=DEFAULTS.save_every,
                    help="write a checkpoint and compute the validation loss every N steps (and on the last)")
    io.add_argument("--init_from", default=DEFAULTS.init_from,
                    help="resume training from the save dir at this path (config.yaml, vocab.json and "
                         "checkpoints written by train.py): same step, epoch, learning rate and data position")
    io.add_argument("--print_every", type=cli.positive_int, default=DEFAULTS.print_every,
                    help="print training stats every N steps")
    io.add_argument("--log_dir", default=DEFAULTS.log_dir, help="TensorBoard log directory (default: SAVE_DIR/logs)")

    samples = parser.add_argument_group("samples while training (printed, appended to SAVE_DIR/samples.txt and "
                                        "logged to TensorBoard)")
    samples.add_argument("--sample_every", type=cli.sample_every, default=DEFAULTS.sample_every,
                         help="sample every N steps; 0: at each checkpoint (--save_every, and the last step); "
                              "-1: never")
    samples.add_argument("--sample_length", type=cli.positive_int, default=DEFAULTS.sample_length,
                         help="tokens per sample, after the empty prime (the start of a line)")
    samples.add_argument("--sample_temperatures", type=temperatures, default=DEFAULTS.sample_temperatures,
                         help="comma-separated temperatures: one sample at each")
    samples.add_argument("--sample_seed", type=cli.non_negative_int, default=DEFAULTS.sample_seed,
                         help="the seed of every sample, so that the samples of different steps compare")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULTS.model, choices=CELL_TYPES, help="rnn, gru, or lstm")
    model.add_argument("--rnn_size", type=cli.positive_int, default=DEFAULTS.rnn_size,
                       help="size of RNN hidden state")
    model.add_argument("--num_layers", type=cli.positive_int, default=DEFAULTS.num_layers,
                       help="number of layers in the RNN")
    model.add_argument("--dropout", type=cli.probability, default=DEFAULTS.dropout,
                       help="probability of dropping each unit of a layer's output, in training only")
    model.add_argument("--word2vec_embedding", default=DEFAULTS.word2vec_embedding,
                       help="initialise the embedding from word2vec vectors (word2vec text/binary format, or a "
                            "gensim 4 KeyedVectors/Word2Vec file: those are pickles, load only trusted ones)")

    optimization = parser.add_argument_group("optimization")
    optimization.add_argument("--batch_size", type=cli.positive_int, default=DEFAULTS.batch_size,
                              help="minibatch size (parallel streams of text)")
    optimization.add_argument("--seq_length", type=cli.positive_int, default=DEFAULTS.seq_length,
                              help="RNN sequence length (steps of backpropagation through time)")
    optimization.add_argument("--num_epochs", type=cli.positive_int, default=DEFAULTS.num_epochs,
                              help="number of epochs")
    optimization.add_argument("--max_steps", type=cli.non_negative_int, default=DEFAULTS.max_steps,
                              help="stop (with a checkpoint) after this many steps in all; 0: no limit")
    optimization.add_argument("--grad_clip", type=cli.positive_float, default=DEFAULTS.grad_clip,
                              help="clip gradients to this global norm")
    optimization.add_argument("--learning_rate", type=cli.positive_float, default=DEFAULTS.learning_rate,
                              help="Adam learning rate")
    optimization.add_argument("--decay_rate", type=cli.positive_float, default=DEFAULTS.decay_rate,
                              help="per-epoch learning-rate decay: epoch e uses learning_rate * decay_rate**e")
    optimization.add_argument("--weight_decay", type=cli.weight_decay, default=DEFAULTS.weight_decay,
                              help="decoupled weight decay (AdamW's): each step every weight shrinks by its "
                                   "current learning rate x this; 0: none (the original's Adam)")
    optimization.add_argument("--seed", type=cli.non_negative_int, default=DEFAULTS.seed,
                              help="random seed, for a repeatable run (default: a random one, saved in config)")

    devices = parser.add_argument_group("devices and machines (README: Training on several devices)")
    devices.add_argument("--strategy", default=DEFAULTS.strategy, choices=STRATEGIES,
                         help="one: one device; mirrored: every GPU of this machine (or the CPU split into "
                              "--replicas devices); multi_worker: the machines TF_CONFIG names; auto: multi_worker "
                              "when TF_CONFIG names a cluster, mirrored with several GPUs or --replicas, else one")
    devices.add_argument("--replicas", type=cli.non_negative_int, default=DEFAULTS.replicas,
                         help="mirrored: how many GPUs to use, or without GPUs how many logical devices to split the "
                              "CPU into (0: every GPU, or one CPU device); batch_size must divide among them")
    devices.add_argument("--cluster_timeout", type=cli.positive_float, default=DEFAULTS.cluster_timeout,
                         help="multi_worker: seconds each worker waits for the others TF_CONFIG names to start, "
                              "before it stops with one line")
    devices.add_argument("--precision", default=DEFAULTS.precision, choices=PRECISIONS,
                         help="bfloat16: the recurrent layers' matrix products in bfloat16 (weights, optimizer, loss "
                              "and state stay float32; checkpoints are float32 either way); auto: bfloat16 on a CPU "
                              f"with AVX-512 BF16 or AMX at --rnn_size {AUTO_MIN_RNN_SIZE} or more, else float32")
    return parser


def temperatures(text):
    """--sample_temperatures: comma-separated positive numbers, kept as given (config.yaml records them)."""
    try:
        parse_temperatures(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive numbers separated by commas (1.2e-38 to "
                                         f"3.4e+38)")
    return text


def preset_flags(preset):
    """A preset's settings as the flags that give them."""
    return " ".join(f"--{name} {value}" for name, value in preset.settings.items())


def given_flags(argv):
    """The destinations of the flags present in argv (abbreviations included), as argparse reads them."""
    parser, absent = build_parser(), object()  # not a string: argparse converts string defaults with their type
    parser.set_defaults(**{action.dest: absent for action in parser._actions})
    return {name for name, value in vars(parser.parse_args(argv)).items() if value is not absent}


def main(argv=None):
    args = build_parser().parse_args(argv)
    given = given_flags(argv)

    settings = vars(args)
    if args.init_from:  # None: take it from the checkpoint
        settings.update({name: None for name in RESUMED_SETTINGS if name not in given})
    if args.preset:  # its settings, as if given, under the flags actually given
        settings.update({name: value for name, value in PRESETS[args.preset].settings.items() if name not in given})
    config = TrainConfig(**settings)

    def start():
        if os.environ.get("TF_CONFIG") and not os.environ.get("CHAR_RNN_VERBOSE"):
            # A worker of a cluster: a lost peer is our one line, not also TensorFlow's C++ error log.
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        cli.quiet_tensorflow(one_thread_per_op=True)
        import trainer  # after the flags: --help and flag errors stay fast
        return trainer.train(config)
    return cli.run(start)  # Ctrl-C from here on, TensorFlow's import included, is one line and exit 130


if __name__ == "__main__":
    sys.exit(main())
