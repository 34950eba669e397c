"""Sample text from a model trained by train.py.

usage: python sample.py [--save_dir save] [-n 500] [--prime The] [--sample 1] [--temperature 1.0] [--seed 1]
       python sample.py --save_dir save/best       # the model with the lowest validation loss
       python sample.py --top_p 0.9 --stop '\\n\\n'  # nucleus sampling, ending at the first blank line
       python sample.py --num_samples 3             # three samples of the prime, each with its seed
       python sample.py --beam_width 8 -n 100       # the likeliest continuation beam search finds
       python sample.py --logprobs 5 --json         # one JSON object: the text, its settings, each token's logprob
       python sample.py -i                          # primes from the terminal (or a pipe), the model loaded once
"""
import argparse
import json
import os
import sys

import cli
from settings import SETTINGS, SampleSettings, check_beam_width, check_settings, check_stops
from token_logprobs import logprobs_json

DESCRIPTION = "Generate text from a trained char-rnn model: the prime followed by n sampled tokens."


def build_parser():
    """The original's flags and defaults, the sampling settings added since (settings.SETTINGS declares them
    all), --stop, --num_samples, --beam_width and -i."""
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_model_flags(parser)
    for setting in SETTINGS:
        choices = None if setting.choices is None else list(setting.choices)
        parser.add_argument(setting.flag, dest=flag_dest(setting), type=setting.parse, default=setting.default,
                            choices=choices, help=setting.help)
    parser.add_argument("--stop", action="append", type=cli.escaped_text, default=[], metavar="TEXT",
                        help="end the sample right before the first place its generated text contains TEXT (which is "
                             "not printed); repeatable; \\n, \\t, \\r and \\\\ are read as escapes")
    parser.add_argument("--num_samples", type=cli.positive_int, default=1, metavar="K",
                        help="K samples of the prime, generated together; sample i uses seed + i - 1 and is printed "
                             "after a line naming it and its seed")
    parser.add_argument("--beam_width", type=cli.non_negative_int, default=0, metavar="B",
                        help="instead of sampling, the likeliest continuation of n tokens that a beam search of width "
                             "B finds, never less likely than argmax's (its log-probability goes to stderr); "
                             "deterministic; 0: sample")
    parser.add_argument("--json", action="store_true",
                        help="print each sample as one line of JSON: its text, settings and seed, and with --logprobs "
                             "its tokens' log-probabilities (tokens, token_logprobs, top_logprobs, text_offset)")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="read primes in a loop (from the terminal, or one a line from a pipe) and answer each as "
                             "it is generated; :help lists the commands that change the settings")
    return parser


def flag_dest(setting):
    """The attribute of a setting's flag in the parsed arguments: -n is args.n, --sample args.sample."""
    return setting.flag.lstrip("-")


def settings_of(args):
    """The SampleSettings that the flags give."""
    return SampleSettings(**{setting.name: getattr(args, flag_dest(setting)) for setting in SETTINGS})


def check_flags(args, settings):
    """Refuse, in one line, flags that are wrong on their face: out of range, or that do not go together.
    Called before TensorFlow loads, so that a mistyped flag is told at once, not after seconds of start-up."""
    if args.beam_width and (args.num_samples > 1 or args.interactive or args.stop):
        raise ValueError("--beam_width finds one continuation: it does not combine with --num_samples, -i or --stop")
    if args.interactive and args.num_samples > 1:
        raise ValueError("-i answers one sample a prime: it does not combine with --num_samples")
    if args.json and (args.beam_width or args.interactive):
        raise ValueError("--json prints samples: it does not combine with --beam_width or -i")
    if settings.logprobs and not args.json:
        raise ValueError("--logprobs are reported in JSON: add --json")
    check_settings(settings)
    check_stops(args.stop)
    if args.beam_width:
        check_beam_width(args.beam_width)


def print_samples(sampler, settings, count, stops):
    """--num_samples: each sample after a line naming it and its seed."""
    for i, (seed, text) in enumerate(sampler.run_many(settings, count, stops), 1):
        sys.stdout.write(f"--- sample {i} of {count}, seed {seed} ---\n{text}\n")


def print_json(sampler, settings, count, stops):
    """--json: each sample as one line of JSON, its settings (the seed it was drawn with) and its logprobs."""
    from request_parsing import settings_json
    for sample in sampler.samples(settings, count, stops):
        drawn = settings_json(settings) | {"seed": sample.seed}
        logprobs = logprobs_json(sample.logprobs) if settings.logprobs else None
        sys.stdout.write(json.dumps({"text": sample.text, **drawn, "logprobs": logprobs}) + "\n")


def print_beam(sampler, settings, width):
    text, log_probability = sampler.beam_search(settings.prime, settings.n, width)
    sys.stdout.write(text + "\n")
    print(f"log-probability {log_probability:.4f} (beam width {width})", file=sys.stderr)


def print_stream(sampler, settings, stops):
    """The sample as it is generated, block by block."""
    for piece in sampler.stream(settings, stops):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = settings_of(args)

    def sample():
        check_flags(args, settings)
        cli.use_compilation_cache()
        cli.quiet_tensorflow()
        from sampler import Sampler
        sampler = Sampler.load(args.save_dir, args.word_level)
        if args.interactive:
            import interactive
            return interactive.loop(sampler, settings, args.stop)
        if args.beam_width:
            print_beam(sampler, settings, args.beam_width)
        elif args.json:
            print_json(sampler, settings, args.num_samples, args.stop)
        elif args.num_samples > 1:
            print_samples(sampler, settings, args.num_samples, args.stop)
        else:
            print_stream(sampler, settings, args.stop)

    return cli.run(sample)


if __name__ == "__main__":
    code = main()
    # Done: the output is flushed, nothing is left to write. Python's own teardown of TensorFlow would take
    # another 0.6 s or so (as long as after a bare `import tensorflow`), which a one-off run need not wait for.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a reader that left early (| head): nothing more to say
        pass
    os._exit(code)
