"""Measure a trained model: loss in nats and bits per token, and perplexity, over every token of a text.

usage: python evaluate.py --save_dir save                      # the validation split of the training data
       python evaluate.py --save_dir save/best --text other.txt
"""
import argparse
import dataclasses
import json
import math
import sys

import cli
from settings import TRAIN_DEFAULTS

DESCRIPTION = "Evaluate a trained char-rnn model on its validation split or on any text."


def build_parser():
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--save_dir", default=TRAIN_DEFAULTS.save_dir,
                        help="save dir written by train.py (SAVE_DIR/best too)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", default=None, help="evaluate on this text file instead of a split")
    source.add_argument("--split", default="val", choices=["val", "train"],
                        help="which part of the training data (data_dir and val_frac from config.yaml)")
    parser.add_argument("--data_dir", default=None,
                        help="data dir of the training text, for --split (default: the data_dir in config.yaml, "
                             "which is relative to where train.py ran)")
    parser.add_argument("--encoding", default=None, help="encoding of --text (default: the model's)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return parser


def split_ids(config, vocab, split, data_dir=None):
    """The token ids of the training run's validation or training split (of `data_dir`, or the one `config`, the
    run's settings.TrainConfig, names), checked against the model's vocab; returns (ids, a description of them)."""
    from utils import TextLoader
    data_dir = data_dir or config.data_dir
    if data_dir is None:
        raise ValueError("this save dir's config.yaml does not say which data it was trained on; "
                         "give --data_dir or use --text")
    # A default corpus that is missing comes from $CHAR_RNN_DATA_URL or its public address, not from the mirror
    # the run was given.
    loader = TextLoader.from_config(dataclasses.replace(config, data_dir=data_dir, data_url=None))
    if loader.vocab != vocab:
        raise ValueError(f"{data_dir} no longer holds the text this model was trained on "
                         f"(its vocabulary differs); evaluate with --text instead")
    ids = loader.val_ids if split == "val" else loader.train_ids
    if len(ids) < 2:
        raise ValueError(f"the {split} split is empty (val_frac {config.val_frac}); use --text")
    return ids, f"{split} split of {data_dir}"


def text_ids(path, loaded, encoding):
    """The token ids of a text file, refusing tokens the model does not know (unless it has an unk token)."""
    from utils import encode_tokens, read_text_chunks, tokenize
    config = loaded.train_config
    text = "".join(read_text_chunks(path, encoding or config.encoding, config.keep_crlf))
    index = {token: i for i, token in enumerate(loaded.vocab)}
    return encode_tokens(tokenize(text, config.word_level), index, loaded.unk_token, config.word_level,
                         what=path), path


def evaluate(args):
    import savedir
    from evaluation import full_pass_loss
    loaded = savedir.load(args.save_dir)
    if args.text:
        ids, source = text_ids(args.text, loaded, args.encoding)
    else:
        ids, source = split_ids(loaded.train_config, loaded.vocab, args.split, args.data_dir)
    loss, count = full_pass_loss(loaded.model, ids)
    result = {"source": source, "tokens": count, "loss_nats": loss, "bits_per_token": loss / math.log(2),
              "perplexity": math.exp(loss), "checkpoint": loaded.path}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{source}: {count:,} predicted tokens, checkpoint {loaded.path}")
        print(f"loss = {loss:.4f} nats/token, {result['bits_per_token']:.4f} bits/token, "
              f"perplexity = {result['perplexity']:.3f}")


def main(argv=None):
    args = build_parser().parse_args(argv)

    def start():
        cli.quiet_tensorflow()
        evaluate(args)
    return cli.run(start)


if __name__ == "__main__":
    sys.exit(main())
