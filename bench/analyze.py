"""Speed of analyze.py's pass against evaluate.py's full pass, on the same text and model, in turns.

usage: python bench/analyze.py [--data ../shared/data/tinyshakespeare/input.txt] [--rounds 3] [--top 5]

The model has the default settings (3 x 128 LSTM; untrained weights, as speed does not depend on them). Each round
times evaluation.full_pass_loss (what evaluate.py runs: 32 streams, compiled chunks of 256 steps) and then
analysis.Analyzer.run (what analyze.py runs: the same arithmetic, the chosen layer's state kept at every step, the
top-K, the features and their correlations with every cell); one untimed pass of each compiles them first. Prints one line per round
and then one JSON line: the median tokens/s of each, and the median of the rounds' ratios (analysis / evaluation),
which a busy machine disturbs less than either speed.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
from settings import ANALYSIS_TOP  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare", "input.txt")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="a UTF-8 text (default: tinyshakespeare beside the repo)")
    parser.add_argument("--rounds", type=cli.positive_int, default=5, help="timed rounds of each, in turns")
    parser.add_argument("--top", type=cli.positive_int, default=ANALYSIS_TOP, help="alternatives kept per position")
    return parser


def timed(action):
    """Seconds that action() takes."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.quiet_tensorflow()
    import analysis
    import evaluation
    from model import CharRNN
    from settings import ModelConfig

    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    vocab = sorted(set(text))
    index = {token: i for i, token in enumerate(vocab)}
    ids = [index[c] for c in text]
    model = CharRNN(ModelConfig(len(vocab)))  # the default model: 3 x 128 LSTM
    model.build_weights()
    analyzer = analysis.Analyzer(model)
    eval_chunk = evaluation.make_eval_chunk(model)
    layer = model.num_layers - 1

    def evaluate_pass(part):
        evaluation.full_pass_loss(model, part, eval_chunk)

    def analysis_pass(part):
        tokens = list(text[:len(part)])
        analyzer.run(part, layer, args.top, features=analysis.token_features(tokens))

    evaluate_pass(ids)  # a whole untimed pass of each compiles every chunk shape it meets
    analysis_pass(ids)
    count = len(ids) - 1
    speeds = {"evaluate": [], "analyze": []}
    for round_number in range(args.rounds):
        for name, run in (("evaluate", evaluate_pass), ("analyze", analysis_pass)):
            speeds[name].append(count / timed(lambda: run(ids)))
        print(f"round {round_number + 1}: evaluate {speeds['evaluate'][-1]:,.0f} tokens/s, "
              f"analyze {speeds['analyze'][-1]:,.0f} tokens/s", file=sys.stderr)
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    ratios = [analyzed / evaluated for analyzed, evaluated in zip(speeds["analyze"], speeds["evaluate"])]
    print(json.dumps({"tokens": count, "model": "lstm 3x128", "top": args.top, "rounds": args.rounds,
                      "evaluate_tokens_per_s": round(medians["evaluate"]),
                      "analyze_tokens_per_s": round(medians["analyze"]),
                      "ratio": round(statistics.median(ratios), 3),
                      "ratios": [round(ratio, 3) for ratio in ratios]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
