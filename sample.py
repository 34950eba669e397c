"""Sample text from a model trained by train.py.

usage: python sample.py [--save_dir save] [-n 500] [--prime The] [--sample 1] [--temperature 1.0] [--seed 1]
       python sample.py --save_dir save/best       # the model with the lowest validation loss
"""
import argparse
import sys

import cli
from settings import SAMPLE_MODES, SampleSettings

DEFAULTS = SampleSettings()
DESCRIPTION = "Generate text from a trained char-rnn model: the prime followed by n sampled tokens."


def build_parser():
    """The original's flags and defaults, plus --seed and --top_k."""
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_flags(parser)
    parser.add_argument("-n", type=cli.non_negative_int, default=DEFAULTS.n,
                        help="number of tokens (characters, or words at word level) to sample")
    parser.add_argument("--prime", default=DEFAULTS.prime,
                        help="prime text fed to the network first; empty: start as if at a new line")
    parser.add_argument("--sample", type=int, default=DEFAULTS.mode, choices=list(SAMPLE_MODES),
                        help="0 to use argmax at each timestep, 1 to sample at each timestep, 2 to sample only "
                             "after a space (argmax elsewhere; at word level the same as 1)")
    parser.add_argument("--temperature", type=cli.positive_float, default=DEFAULTS.temperature,
                        help="divides the logits: below 1 more conservative, above 1 more varied; any value > 0 that "
                             "float32 holds (1.2e-38 to 3.4e+38)")
    parser.add_argument("--top_k", type=cli.non_negative_int, default=DEFAULTS.top_k,
                        help="sample only among the k likeliest tokens (0: all)")
    parser.add_argument("--seed", type=cli.non_negative_int, default=DEFAULTS.seed,
                        help="random seed, for repeatable output (default: a random one)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = SampleSettings(args.prime, args.n, args.sample, args.temperature, args.seed, args.top_k)

    def sample():
        cli.quiet_tensorflow()
        from sampler import Sampler
        sampler = Sampler.load(args.save_dir, args.word_level)
        text = sampler.run(settings)
        sys.stdout.write(text + "\n")

    return cli.run(sample)


if __name__ == "__main__":
    sys.exit(main())
