"""Quality yardstick: train a configuration on the first 90% of a text, report the loss on the last 10%.

usage: python bench/quality.py --data ../shared/data/tinyshakespeare/input.txt [--preset best] [train.py flags]

Prints one JSON line: val_loss_nats (mean next-token loss over every token of the held-out tail, read as one
sequence with the state carried, as the PyTorch peer measures it), val_bits_per_token, and the run's settings.
Any other flag is passed to train.py (--model, --rnn_size, --num_layers, --seed, ...).
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="path to a UTF-8 input.txt")
    parser.add_argument("--val_frac", type=cli.fraction, default=0.1)
    parser.add_argument("--work_dir", default=None, help="where to train (default: a temporary directory)")
    args, train_flags = parser.parse_known_args(argv)
    cli.quiet_tensorflow(one_thread_per_op=True)
    import evaluate
    import savedir
    import train
    from evaluation import full_pass_loss

    work = args.work_dir or tempfile.mkdtemp(prefix="char-rnn-quality-")
    data_dir, save_dir = os.path.join(work, "data"), os.path.join(work, "save")
    os.makedirs(data_dir, exist_ok=True)
    shutil.copyfile(args.data, os.path.join(data_dir, "input.txt"))
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # progress lines go to stderr, the JSON line alone to stdout
        code = train.main(["--data_dir", data_dir, "--save_dir", save_dir, "--val_frac", str(args.val_frac),
                           "--print_every", "100", *train_flags])
    if code:
        return code
    train_seconds = time.perf_counter() - started
    loaded = savedir.load(save_dir)
    run, network = loaded.train_config, loaded.model_config
    val_ids, _ = evaluate.split_ids(run, loaded.vocab, "val")  # the run's own tokenization settings
    val_loss, count = full_pass_loss(loaded.model, val_ids, num_streams=1)
    result = {"project": "char-rnn-tensorflow", "mode": "quality", "model": network.model,
              "rnn_size": network.rnn_size, "num_layers": network.num_layers, "batch_size": run.batch_size,
              "seq_length": run.seq_length, "num_epochs": run.num_epochs, "preset": run.preset,
              "dropout": network.dropout, "vocab_size": network.vocab_size, "max_steps": run.max_steps,
              "precision": run.precision,
              "train_seconds": round(train_seconds, 1), "val_loss_nats": round(val_loss, 4),
              "val_bits_per_token": round(val_loss / math.log(2), 4), "val_tokens": count + 1}
    print(json.dumps(result))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
