"""See inside a trained model: how sure it was of each token of a text (with its likeliest alternatives), its most
surprising lines, and the cells of a layer that track simple features of the text (inside quotes, position in the
line, ...), as a summary, an HTML report and JSON.

usage: python analyze.py --save_dir save text.txt --html report.html
       python analyze.py --save_dir save/best - --json analysis.json --top 10 --cells 20 --layer 1 < text.txt
"""
import argparse
import json
import os
import sys

import cli
import settings
from value_types import number_type

DESCRIPTION = ("Analyze a text with a trained char-rnn model: each token's probability and surprise, the likeliest "
               "alternatives, the most surprising lines, and the cells that track features of the text.")
STDIN = "-"
SHOWN_LINE_CHARS = 70  # a surprising line is cut to this many characters in the summary

MAX_TOP, MAX_CELLS = settings.MAX_ANALYSIS_TOP, settings.MAX_ANALYSIS_CELLS
REPORT_MAX_TOKENS = settings.REPORT_MAX_TOKENS
top_count = number_type(int, lambda v: 1 <= v <= MAX_TOP, f"an integer from 1 to {MAX_TOP}")
cell_count = number_type(int, lambda v: 1 <= v <= MAX_CELLS, f"an integer from 1 to {MAX_CELLS}")


def build_parser():
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Input and output
    parser.add_argument("text", metavar="TEXT_FILE", help=f"the text to analyze ({STDIN}: standard input)")
    parser.add_argument("--save_dir", default=settings.TRAIN_DEFAULTS.save_dir,
                        help="save dir written by train.py (SAVE_DIR/best for the best model)")
    parser.add_argument("--html", default=None, metavar="OUT.html",
                        help=f"write the report here: one self-contained page of the first "
                             f"{REPORT_MAX_TOKENS:,} tokens")
    parser.add_argument("--json", default=None, metavar="OUT.json",
                        help="write the whole analysis here as JSON (every token; the cells' activations over the "
                             f"first {REPORT_MAX_TOKENS:,} positions)")
    parser.add_argument("--encoding", default=None, help="encoding of the text (default: the model's)")
    # What to show
    parser.add_argument("--top", type=top_count, default=settings.ANALYSIS_TOP,
                        help="likeliest alternatives shown for each token")
    parser.add_argument("--cells", type=cell_count, default=settings.ANALYSIS_CELLS,
                        help="cells listed, those that track a feature of the text best first")
    parser.add_argument("--layer", type=cli.positive_int, default=None,
                        help="the layer whose cells are analyzed, 1 the first (default: the last)")
    return parser


def check_paths(args):
    """Refuse, before TensorFlow loads, outputs that would overwrite the text or each other."""
    outputs = [path for path in (args.html, args.json) if path]
    if args.text != STDIN and not os.path.isfile(args.text):
        raise FileNotFoundError(f"{args.text} is not a file: give the text to analyze, or - for standard input")
    if args.text != STDIN and any(os.path.abspath(path) == os.path.abspath(args.text) for path in outputs):
        raise ValueError("--html and --json must not name the text being analyzed: it would be overwritten")
    if len(outputs) == 2 and os.path.abspath(args.html) == os.path.abspath(args.json):
        raise ValueError("--html and --json name the same file; give two")


def read_text(args, train_config):
    """The text, decoded in --encoding or the model's (line endings as training read them)."""
    from utils import normalize_newlines, read_text_chunks
    encoding = args.encoding or train_config.encoding
    if args.text == STDIN:
        data = sys.stdin.buffer.read()
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError as error:
            raise ValueError(f"standard input is not valid {encoding} at byte {error.start}") from None
        return normalize_newlines(text.removeprefix("\ufeff"), train_config.keep_crlf)
    return "".join(read_text_chunks(args.text, encoding, train_config.keep_crlf))


def analyze(args):
    import analysis
    import analysis_report
    import savedir
    loaded = savedir.load(args.save_dir)
    text = read_text(args, loaded.train_config)
    word_level = loaded.train_config.word_level
    result, tokens, layer = analysis.run_text(analysis.Analyzer(loaded.model), text, loaded.vocab, loaded.unk_token,
                                              word_level, args.top, args.layer)
    # Every token's entry is made again while the JSON is written, one by one: a megabyte's would take gigabytes.
    data = analysis.report_data(result, tokens, loaded.vocab, word_level, args.cells, layer, loaded.model,
                                positions_limit=REPORT_MAX_TOKENS)
    data = {"source": "standard input" if args.text == STDIN else args.text, "checkpoint": loaded.path, **data}
    if args.json:
        write_json(args.json, data, analysis.positions_json(result, tokens, loaded.vocab))
    if args.html:
        analysis_report.write_report(args.html, data)
    print_summary(data, args)


def write_json(path, data, positions):
    """Write `data` as JSON with every entry of `positions` as its "positions" (last), entry by entry; the file is
    written whole or not at all."""
    from files import atomic_write_chunks
    head = json.dumps({key: value for key, value in data.items() if key != "positions"}, ensure_ascii=False)

    def pieces():
        yield (head[:-1] + ', "positions": [').encode("utf-8")
        for i, entry in enumerate(positions):
            yield ((", " if i else "") + json.dumps(entry, ensure_ascii=False)).encode("utf-8")
        yield b"]}"
    atomic_write_chunks(path, pieces())


def print_summary(data, args):
    print(f"{data['source']}: {data['tokens']:,} tokens, {data['bits_per_token']:.4f} bits per token "
          f"({data['loss_nats']:.4f} nats), checkpoint {data['checkpoint']}")
    print("most surprising lines:")
    for line in data["surprising_lines"]:
        print(f"  line {line['line']} ({line['bits_per_token']:.2f} bits/token): "
              f"{line['text'][:SHOWN_LINE_CHARS]!r}")
    print(f"cells of layer {data['layer']} ({data['state']}) that track a feature:")
    for cell in data["cells"]:
        print(f"  cell {cell['cell']}: {cell['feature']}, r = {cell['r']:+.3f}")
    if args.html:
        covered = "" if data["tokens"] <= REPORT_MAX_TOKENS else f" (the first {REPORT_MAX_TOKENS:,} tokens)"
        print(f"report: {args.html}{covered}")
    if args.json:
        print(f"JSON: {args.json}")


def main(argv=None):
    args = build_parser().parse_args(argv)

    def start():
        check_paths(args)
        cli.quiet_tensorflow()
        analyze(args)
    return cli.run(start)


if __name__ == "__main__":
    sys.exit(main())
