"""Plot the loss curves of one or more training runs to a PNG: training and validation loss against the step
(left) and against wall-clock time (right), one colour per run.

usage: python plot.py save --out curves.png
       python plot.py save/small save/big --out compare.png --title "2 x 128 against 3 x 512"

Reads each save dir's metrics.csv as train.py writes it. Needs matplotlib, not TensorFlow, so it starts fast
and can run beside a training run (the rows written so far are plotted).
"""
import argparse
import csv
import io
import math
import os
import sys

import cli

# As savedir.py names them (importing savedir would load TensorFlow; tests/test_plot.py checks they agree).
METRICS_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
NEEDED_COLUMNS = ("step", "train_loss", "val_loss", "elapsed_s")  # of savedir.METRICS_COLUMNS

DPI = 100
DEFAULT_SIZE = (1200, 500)  # pixels: 12 x 5 inches at DPI
MIN_PIXELS, MAX_PIXELS = 200, 10000  # per side (smaller leaves no room for the axes)
FORMAT = ".png"
SMOOTHING_POINTS = 25  # the moving average of the training loss spans about 1/SMOOTHING_POINTS of a run's rows
MAX_LEGEND_COLUMNS = 6

DESCRIPTION = ("Plot the training and validation loss (nats per token) of one or more save dirs written by\n"
               "train.py against the step and against wall-clock time, to a PNG.")
EPILOG = """examples:
  python plot.py save --out curves.png
  python plot.py save/small save/big --out compare.png --title "2 x 128 against 3 x 512"

Each run has one colour: its training loss is drawn thin and light with a moving average over it, its validation
loss (written at each save) as dots joined by a dashed line. A run without validation rows (--val_frac 0) has
training curves only. A validation row's time is that of the training row of its step, or of the last one before
it. A step written twice (replayed after a resume) counts once, with its last row. The legend names each run by
its save dir (and the preset of its config.yaml, if it has one). The PNG is written atomically: a failure leaves
no partial file."""


class Run:
    """One save dir's curves, as read_curves returns them, and its name in the legend."""

    def __init__(self, path, label, train, val):
        self.path, self.label = path, label
        self.train = train  # [(step, train_loss, elapsed_s)]
        self.val = val  # [(step, val_loss, elapsed_s or None when no training row is at or before it)]


def pixel_size(text):
    """argparse type of --size: WIDTHxHEIGHT in pixels."""
    width, x, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        size = None
    if not x or size is None or not all(MIN_PIXELS <= side <= MAX_PIXELS for side in size):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT in pixels (each {MIN_PIXELS} to "
                                         f"{MAX_PIXELS}), e.g. 1200x500")
    return size


pixel_size.__name__ = "WIDTHxHEIGHT"


def build_parser():
    parser = argparse.ArgumentParser(description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("save_dirs", nargs="+", metavar="SAVE_DIR",
                        help="save dirs written by train.py (each has a metrics.csv)")
    parser.add_argument("--out", required=True, metavar="FILE.png",
                        help="the PNG to write (its folder must exist; the file is replaced if it exists)")
    parser.add_argument("--title", default=None, metavar="TEXT",
                        help="the figure's title (default: 'Training and validation loss' and the runs' names)")
    parser.add_argument("--size", type=pixel_size, default=DEFAULT_SIZE, metavar="WIDTHxHEIGHT",
                        help=f"size of the PNG in pixels (default: {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}, "
                             f"i.e. {DEFAULT_SIZE[0] // DPI} x {DEFAULT_SIZE[1] // DPI} inches at {DPI} dpi)")
    return parser


# ----------------------------------------------------------------------------------------------------------
# Reading metrics.csv


def _number(text, path, line, column):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}, line {line}: {column} is {text!r}, not a number; "
                         f"it is not a metrics.csv written by train.py") from None


def read_curves(save_dir):
    """(training rows, validation rows) of save_dir/metrics.csv, each sorted by step: [(step, loss, elapsed_s)].

    A step written twice (a resume replays the steps after its checkpoint) keeps its last row of each kind.
    A validation row's elapsed_s is the training row's of the same step, or of the last one before it (None
    when there is none). Rows with a loss that is not finite are left out. Raises FileNotFoundError or
    ValueError with a one-line message.
    """
    path = metrics_path(save_dir)
    header, rows = read_rows(path)
    train, val = losses_by_step(path, header, rows)
    if not train and not val:
        raise ValueError(f"{path} has no rows yet: train.py writes one at each progress line and each save")
    train_rows = [(step, loss, elapsed) for step, (loss, elapsed) in sorted(train.items()) if math.isfinite(loss)]
    return train_rows, timed_val_rows(train_rows, val)


def metrics_path(save_dir):
    """The path of save_dir/metrics.csv; raises when there is no save dir or no such file in it."""
    if not os.path.exists(save_dir):
        raise FileNotFoundError(f"save dir {save_dir} does not exist")
    if not os.path.isdir(save_dir):
        raise NotADirectoryError(f"{save_dir} is not a directory: give a save dir written by train.py")
    path = os.path.join(save_dir, METRICS_FILE)
    if not os.path.isfile(path):
        hint = ""
        if os.path.basename(os.path.normpath(save_dir)) == "best":
            hint = " (best/ has no curves: give the save dir above it)"
        raise FileNotFoundError(f"{save_dir} has no {METRICS_FILE}: it is not a save dir written by train.py{hint}")
    return path


def read_rows(path):
    """(header, the rows after it) of a metrics.csv that has every column of NEEDED_COLUMNS."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path} is not a metrics.csv written by train.py ({e.__class__.__name__})") from None
    if not rows:
        raise ValueError(f"{path} is empty: it is not a metrics.csv written by train.py")
    header = rows[0]
    missing = [column for column in NEEDED_COLUMNS if column not in header]
    if missing:
        raise ValueError(f"{path} has no {', '.join(missing)} column: it is not a metrics.csv written by train.py")
    return header, rows[1:]


def losses_by_step(path, header, rows):
    """({step: (train_loss, elapsed_s or None)}, {step: val_loss}) of the rows, the last row of a step winning."""
    index = {column: header.index(column) for column in NEEDED_COLUMNS}
    train, val = {}, {}
    for line, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line}: {len(row)} fields where the header has {len(header)}; "
                             f"it is not a metrics.csv written by train.py")
        cells = {column: row[i].strip() for column, i in index.items()}
        step = _number(cells["step"], path, line, "step")
        if not step.is_integer():
            raise ValueError(f"{path}, line {line}: step is {cells['step']!r}, not a whole number")
        step = int(step)
        if cells["train_loss"]:
            elapsed = _number(cells["elapsed_s"], path, line, "elapsed_s") if cells["elapsed_s"] else None
            train[step] = (_number(cells["train_loss"], path, line, "train_loss"), elapsed)
        if cells["val_loss"]:
            val[step] = _number(cells["val_loss"], path, line, "val_loss")
    return train, val


def timed_val_rows(train_rows, val):
    """The finite validation losses as [(step, loss, elapsed_s)], each timed by the last training row at or
    before its step (None when there is none)."""
    val_rows = []
    timed = [(step, elapsed) for step, _, elapsed in train_rows if elapsed is not None]
    position, elapsed = 0, None
    for step, loss in sorted(val.items()):
        while position < len(timed) and timed[position][0] <= step:
            elapsed = timed[position][1]
            position += 1
        if math.isfinite(loss):
            val_rows.append((step, loss, elapsed))
    return val_rows


def run_label(save_dir, name):
    """A run's name in the legend: `name`, or 'PRESET (name)' when its config.yaml names a preset."""
    path = os.path.join(save_dir, CONFIG_FILE)
    preset = None
    if os.path.isfile(path):
        try:
            import yaml
            with open(path, encoding="utf-8") as f:
                config = yaml.safe_load(f)
            if isinstance(config, dict) and config.get("preset"):
                preset = str(config["preset"])
        except (OSError, ValueError, yaml.YAMLError):
            pass  # the curves do not need the config: an unreadable one only costs the preset's name
    return f"{preset} ({name})" if preset else name


def read_runs(save_dirs):
    """A Run for each save dir, named by its folder's name (or by its path as given, where two names clash)."""
    names = [os.path.basename(os.path.normpath(save_dir)) for save_dir in save_dirs]
    if len(set(names)) < len(names):
        names = [os.path.normpath(save_dir) for save_dir in save_dirs]
    runs = []
    for save_dir, name in zip(save_dirs, names):
        train, val = read_curves(save_dir)
        runs.append(Run(save_dir, run_label(save_dir, name), train, val))
    return runs


# ----------------------------------------------------------------------------------------------------------
# Drawing


def check_out(out):
    """Raise before anything is read or drawn when --out cannot be written as asked."""
    if not out.lower().endswith(FORMAT):
        raise ValueError(f"--out {out} must end in {FORMAT}: plot.py writes PNG images")
    folder = os.path.dirname(out) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder of --out {out} does not exist: create {folder} first")
    if os.path.isdir(out):
        raise IsADirectoryError(f"--out {out} is a directory: give a file name ending in {FORMAT}")


def moving_average(values, window):
    """The mean of each value and its neighbours, window // 2 on each side (fewer at the ends), so that the
    average does not lag behind the falling loss."""
    half = window // 2
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    return [(sums[min(i + half + 1, len(values))] - sums[max(i - half, 0)])
            / (min(i + half + 1, len(values)) - max(i - half, 0)) for i in range(len(values))]


def time_unit(runs):
    """(divisor, name) for the time axis: seconds, minutes or hours, as the longest run fits."""
    longest = max([elapsed for run in runs for _, _, elapsed in run.train + run.val if elapsed is not None],
                  default=0.0)
    if longest >= 2 * 3600:
        return 3600.0, "hours"
    if longest >= 2 * 60:
        return 60.0, "minutes"
    return 1.0, "seconds"


def default_title(runs):
    what = "Training and validation loss" if any(run.val for run in runs) else "Training loss"
    if len(runs) <= 3:
        return f"{what}: {', '.join(run.label for run in runs)}"
    return f"{what} of {len(runs)} runs"


def draw(runs, title, size):
    """The figure as PNG bytes (matplotlib's Agg backend: no display needed)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    divisor, unit = time_unit(runs)
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    smoothed_any = False
    for number, run in enumerate(runs):
        colour = cycle[number % len(cycle)]
        smoothed_any = draw_run(run, colour, (by_step, by_time), divisor) or smoothed_any
        handles.append(Line2D([], [], color=colour, linewidth=3, label=run.label))
    handles.append(Line2D([], [], color="grey", linewidth=1.6,
                          label="training loss (moving average; light: raw)" if smoothed_any
                          else "training loss"))
    if any(run.val for run in runs):
        handles.append(Line2D([], [], color="grey", linestyle="--", linewidth=1.2, marker="o", markersize=4,
                              label="validation loss"))
    label_axes(by_step, by_time, unit)
    figure.suptitle(title)
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), MAX_LEGEND_COLUMNS),
                  frameon=False, fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def draw_run(run, colour, axes_pair, divisor):
    """Draw one run's curves on both axes (by step, by time in units of `divisor` seconds); returns whether its
    training loss was smoothed."""
    steps = [step for step, _, _ in run.train]
    losses = [loss for _, loss, _ in run.train]
    times = [math.nan if elapsed is None else elapsed / divisor for _, _, elapsed in run.train]
    window = max(1, len(losses) // SMOOTHING_POINTS)
    for axes, xs in zip(axes_pair, (steps, times)):
        if window > 1:
            axes.plot(xs, losses, color=colour, linewidth=0.6, alpha=0.3)
            axes.plot(xs, moving_average(losses, window), color=colour, linewidth=1.6)
        else:
            axes.plot(xs, losses, color=colour, linewidth=1.2, alpha=0.8, marker="." if len(xs) == 1 else None)
    if run.val:
        val_steps = [step for step, _, _ in run.val]
        val_losses = [loss for _, loss, _ in run.val]
        val_times = [math.nan if elapsed is None else elapsed / divisor for _, _, elapsed in run.val]
        for axes, xs in zip(axes_pair, (val_steps, val_times)):
            axes.plot(xs, val_losses, color=colour, linestyle="--", linewidth=1.2, marker="o", markersize=4,
                      markeredgecolor="white", markeredgewidth=0.6)
    return window > 1


def label_axes(by_step, by_time, unit):
    """The axes' labels, titles, grids and left edges."""
    from matplotlib.ticker import StrMethodFormatter

    by_step.set_xlabel("step")
    by_step.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))  # 120,000 rather than 1.2 x 1e5
    by_step.set_ylabel("loss (nats per token)")
    by_step.set_title("by training step", fontsize="medium")
    by_time.set_xlabel(f"wall-clock time ({unit})")
    by_time.set_title("by wall-clock time", fontsize="medium")
    for axes in (by_step, by_time):
        axes.grid(True, alpha=0.3)
        axes.set_xlim(left=0)


def plot(args):
    check_out(args.out)
    runs = read_runs(args.save_dirs)
    data = draw(runs, args.title or default_title(runs), args.size)
    from files import atomic_write_bytes
    atomic_write_bytes(args.out, data)
    print(f"wrote {args.out} ({args.size[0]}x{args.size[1]} pixels, {len(runs)} run{'s' * (len(runs) != 1)})")


def main(argv=None):
    args = build_parser().parse_args(argv)
    return cli.run(lambda: plot(args))


if __name__ == "__main__":
    sys.exit(main())
