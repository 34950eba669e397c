"""plot.py: loss curves of save dirs to a PNG, read from metrics.csv as train.py writes it, without TensorFlow."""
import ast
import math
import os
import struct
import subprocess
import sys

import pytest

import plot
from conftest import REPO, error_line, run_script

COLUMNS = ("step", "epoch", "train_loss", "val_loss", "learning_rate", "tokens_per_s", "elapsed_s")


def savedir_constant(name):
    """A constant of savedir.py, read from its source (importing savedir would load TensorFlow)."""
    with open(os.path.join(REPO, "savedir.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"savedir.py has no {name}")


def csv_value(value):
    """A cell as savedir.MetricsLog.write formats it (floats to 6 significant digits, None empty)."""
    return "" if value is None else (f"{value:.6g}" if isinstance(value, float) else str(value))


def write_metrics(save_dir, rows, config=None):
    """A save dir holding metrics.csv with `rows` (dicts of some COLUMNS) and, optionally, config.yaml."""
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, "metrics.csv"), "w", newline="") as f:
        f.write(",".join(COLUMNS) + "\r\n")  # the csv module's line ending, as MetricsLog writes
        for row in rows:
            f.write(",".join(csv_value(row.get(column)) for column in COLUMNS) + "\r\n")
    if config is not None:
        with open(os.path.join(save_dir, "config.yaml"), "w") as f:
            f.write("".join(f"{key}: {value}\n" for key, value in config.items()))
    return str(save_dir)


def run_rows(steps, every=10, validate_every=50, seconds_per_step=0.5, start=1.0):
    """Training rows every `every` steps (a falling loss) and a validation row every `validate_every` steps."""
    rows = []
    for step in range(every, steps + 1, every):
        rows.append({"step": step, "epoch": step // 100, "train_loss": start + 3.0 / math.sqrt(step),
                     "learning_rate": 0.002, "tokens_per_s": 1234.5, "elapsed_s": round(step * seconds_per_step, 1)})
        if validate_every and step % validate_every == 0:
            rows.append({"step": step, "epoch": step // 100, "val_loss": start + 0.2 + 3.0 / math.sqrt(step)})
    return rows


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", header
    return struct.unpack(">II", header[16:24])


def test_plot_reads_the_file_and_columns_savedir_writes():
    assert plot.METRICS_FILE == savedir_constant("METRICS_FILE")
    assert plot.CONFIG_FILE == savedir_constant("CONFIG_FILE")
    assert COLUMNS == savedir_constant("METRICS_COLUMNS")
    assert set(plot.NEEDED_COLUMNS) <= set(COLUMNS)


def test_one_run_with_validation_rows_makes_a_png_of_the_default_size(tmp_path, capsys):
    save = write_metrics(tmp_path / "save", run_rows(500))
    out = tmp_path / "curves.png"
    assert plot.main([save, "--out", str(out)]) == 0
    assert png_size(out) == plot.DEFAULT_SIZE == (1200, 500)
    assert os.path.getsize(out) > 10_000  # curves, text and a legend, not a blank image
    assert "wrote" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "save"]  # no temporary file left beside it


def test_run_without_validation_rows_plots_its_training_curve_only(tmp_path, capsys):
    save = write_metrics(tmp_path / "save", run_rows(300, validate_every=0))
    train, val = plot.read_curves(save)
    assert len(train) == 30 and val == []
    out = tmp_path / "curves.png"
    assert plot.main([save, "--out", str(out), "--size", "800x600"]) == 0
    assert png_size(out) == (800, 600)
    assert capsys.readouterr().err == ""  # nothing is said about the missing validation loss


def test_two_runs_on_one_figure_named_by_folder_or_preset(tmp_path):
    small = write_metrics(tmp_path / "small", run_rows(400, seconds_per_step=0.3))
    best = write_metrics(tmp_path / "best_run", run_rows(600, seconds_per_step=20.0, start=0.8),
                         config={"preset": "best", "rnn_size": 512})
    runs = plot.read_runs([small, best])
    assert [run.label for run in runs] == ["small", "best (best_run)"]
    assert plot.time_unit(runs) == (3600.0, "hours")  # 600 steps x 20 s = 3.3 hours
    out = tmp_path / "compare.png"
    assert plot.main([small, best, "--out", str(out), "--title", "small against best"]) == 0
    assert png_size(out) == (1200, 500)


def test_runs_whose_folders_share_a_name_are_named_by_path(tmp_path):
    first = write_metrics(tmp_path / "a" / "save", run_rows(100))
    second = write_metrics(tmp_path / "b" / "save", run_rows(100))
    labels = [run.label for run in plot.read_runs([first, second])]
    assert labels == [os.path.normpath(first), os.path.normpath(second)]


def test_resumed_run_keeps_the_last_row_of_each_step_and_times_validation_by_its_training_row(tmp_path):
    rows = run_rows(100, every=10, validate_every=50)
    # Killed after step 80, resumed from the checkpoint of step 50: steps 60-80 are written again, with new losses
    # and times that count on from the checkpoint's; the resumed run validates at step 100 only.
    replay = [{"step": step, "epoch": 0, "train_loss": 9.0 + step / 1000, "elapsed_s": 100.0 + step}
              for step in (60, 70, 80)]
    rows = rows[:rows.index(next(r for r in rows if r["step"] == 90))] + replay + [
        {"step": 90, "epoch": 0, "train_loss": 9.09, "elapsed_s": 190.0},
        {"step": 95, "epoch": 0, "val_loss": 9.5},  # a validation row between training rows
        {"step": 100, "epoch": 1, "train_loss": 9.1, "elapsed_s": 200.0},
        {"step": 100, "epoch": 1, "val_loss": 9.2},
        {"step": 100, "epoch": 1, "val_loss": 9.3}]  # the same step validated twice: the last row counts
    save = write_metrics(tmp_path / "save", rows)
    train, val = plot.read_curves(save)
    assert [step for step, _, _ in train] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert [(loss, elapsed) for step, loss, elapsed in train if step >= 60] == [
        (9.06, 160.0), (9.07, 170.0), (9.08, 180.0), (9.09, 190.0), (9.1, 200.0)]
    assert train[0] == (10, pytest.approx(1.0 + 3.0 / math.sqrt(10), abs=1e-5), 5.0)
    assert val == [(50, pytest.approx(1.2 + 3.0 / math.sqrt(50), abs=1e-5), 25.0), (95, 9.5, 190.0),
                   (100, 9.3, 200.0)]


def test_moving_average_is_centred_and_shrinks_at_the_ends():
    assert plot.moving_average([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3) == [1.5, 2.0, 3.0, 4.0, 5.0, 5.5]
    assert plot.moving_average([4.0, 2.0], 1) == [4.0, 2.0]


def test_validation_before_any_training_row_has_no_time(tmp_path):
    save = write_metrics(tmp_path / "save", [{"step": 5, "val_loss": 3.0},
                                             {"step": 10, "train_loss": 2.5, "elapsed_s": 4.0},
                                             {"step": 10, "val_loss": 2.6}])
    assert plot.read_curves(save) == ([(10, 2.5, 4.0)], [(5, 3.0, None), (10, 2.6, 4.0)])


def metrics_file(tmp_path, text):
    save = tmp_path / "save"
    save.mkdir()
    (save / "metrics.csv").write_bytes(text)
    return str(save)


@pytest.mark.parametrize("case, code, message", [
    ("missing", 1, "does not exist"),
    ("file", 1, "is not a directory"),
    ("no_metrics", 1, "has no metrics.csv: it is not a save dir written by train.py"),
    ("best", 1, "give the save dir above it"),
    ("empty", 2, "is empty"),
    ("header_only", 2, "has no rows yet"),
    ("other_csv", 2, "has no step, train_loss, val_loss, elapsed_s column"),
    ("short_row", 2, "line 2: 3 fields where the header has 7"),
    ("not_a_number", 2, "line 2: train_loss is 'abc', not a number"),
    ("binary", 2, "is not a metrics.csv written by train.py"),
    ("out_folder_missing", 1, "does not exist: create"),
    ("out_not_png", 2, "must end in .png"),
    ("out_is_a_dir", 1, "is a directory"),
])
def test_bad_input_is_one_line_and_an_exit_code_and_writes_nothing(tmp_path, capsys, case, code, message):
    header = ",".join(COLUMNS).encode() + b"\r\n"
    good = write_metrics(tmp_path / "good", run_rows(100))
    out = str(tmp_path / "curves.png")
    save = {
        "missing": lambda: str(tmp_path / "nowhere"),
        "file": lambda: str(tmp_path / "good" / "metrics.csv"),
        "no_metrics": lambda: str(tmp_path),
        "best": lambda: str(os.makedirs(tmp_path / "good" / "best") or tmp_path / "good" / "best"),
        "empty": lambda: metrics_file(tmp_path, b""),
        "header_only": lambda: metrics_file(tmp_path, header),
        "other_csv": lambda: metrics_file(tmp_path, b"a,b\r\n1,2\r\n"),
        "short_row": lambda: metrics_file(tmp_path, header + b"10,0,2.5\r\n"),
        "not_a_number": lambda: metrics_file(tmp_path, header + b"10,0,abc,,0.002,100,1.0\r\n"),
        "binary": lambda: metrics_file(tmp_path, header + b"\xff\xfe\x00\x01garbage\r\n"),
    }.get(case, lambda: good)()
    if case == "out_folder_missing":
        out = str(tmp_path / "no_such_folder" / "curves.png")
    elif case == "out_not_png":
        out = str(tmp_path / "curves.pdf")
    elif case == "out_is_a_dir":
        out = str(tmp_path / "folder.png")
        os.makedirs(out)
    before = sorted(os.listdir(tmp_path))
    assert plot.main([good, save, "--out", out]) == code
    assert message in error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == before  # no image, no temporary file


@pytest.mark.parametrize("argv", [[], ["save"], ["save", "--out", "x.png", "--size", "12x"]])
def test_missing_save_dirs_or_out_and_a_bad_size_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot.main(argv)
    assert exit_info.value.code == 2
    assert "usage: " in capsys.readouterr().err


def test_script_plots_without_loading_tensorflow_and_fails_as_a_process_with_one_line(tmp_path):
    save = write_metrics(tmp_path / "save", run_rows(100))
    out = tmp_path / "curves.png"
    check = ("import sys, plot; code = plot.main(sys.argv[1:]); "
             "assert 'tensorflow' not in sys.modules, 'plot.py loaded TensorFlow'; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", check, save, "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert png_size(out) == (1200, 500)
    result = run_script("plot.py", tmp_path / "nowhere", "--out", tmp_path / "other.png")
    assert result.returncode == 1 and result.stderr.splitlines() == [
        f"error: save dir {tmp_path / 'nowhere'} does not exist"]
    assert not (tmp_path / "other.png").exists()
