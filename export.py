"""Export a trained model as a TensorFlow SavedModel that takes text and returns text, for TensorFlow Serving,
another Python program with only TensorFlow installed, or (its single step) LiteRT on a device.

usage: python export.py --save_dir save                     # writes save/export/1
       python export.py --save_dir save/best --export_dir models/shakespeare/2 --tflite
       python export.py --save_dir save --xla                # generation compiled by XLA (faster, see --help)
"""
import argparse
import os
import sys

import cli

EXPORT_SUBDIR = os.path.join("export", "1")  # TensorFlow Serving loads the numbered versions of a model's folder
DESCRIPTION = "Export a trained char-rnn model as a SavedModel (text in, text out) for TensorFlow Serving."


def build_parser():
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--save_dir", default="save", help="save dir written by train.py (SAVE_DIR/best too)")
    parser.add_argument("--export_dir", default=None,
                        help=f"where the SavedModel goes (default: SAVE_DIR/{EXPORT_SUBDIR}, the numbered version "
                             f"folder TensorFlow Serving expects)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier export in --export_dir (a folder holding anything else is never "
                             "replaced)")
    parser.add_argument("--tflite", action="store_true",
                        help="also convert the step signature to LiteRT (TFLite): EXPORT_DIR/assets.extra/step.tflite")
    parser.add_argument("--xla", action="store_true",
                        help="compile the generation loop with XLA: faster (docs/export.md), but it runs only where "
                             "XLA does: TensorFlow in Python, or TensorFlow Serving on a GPU or started with "
                             "--xla_cpu_compilation_enabled=true")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    export_dir = args.export_dir or os.path.join(args.save_dir, EXPORT_SUBDIR)

    def export():
        cli.quiet_tensorflow()
        import exporter
        import savedir
        replacing = exporter.check_export_dir(export_dir, args.force)  # before the model loads
        loaded = savedir.load(args.save_dir)
        exporter.write_export(loaded, export_dir, args.tflite, args.xla)
        done = "replaced the earlier export in" if replacing else "exported to"
        extra = f" and {exporter.TFLITE_FILE}" if args.tflite else ""
        compiled = ", generation compiled by XLA" if args.xla else ""
        print(f"{done} {export_dir}: {loaded.path} as signatures serving_default (= generate), generate_batch and "
              f"step{extra}{compiled}")

    return cli.run(export)


if __name__ == "__main__":
    sys.exit(main())
