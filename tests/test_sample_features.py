"""sample.py for daily use: stop strings, several samples, beam search from the command line, the interactive
mode (through a pseudo-terminal and a pipe), streaming, and the one-line refusals of the new flags."""
import io
import json
import os
import pty
import select
import subprocess
import sys
import time

import pytest

import interactive
import sample
from conftest import REPO, SPAWN_TIMEOUT_S, run_script
from sampler import GENERATE_BLOCK, Sampler
from settings import MAX_PRIME, SampleSettings


@pytest.fixture(scope="module")
def sampler(trained_save_dir):
    return Sampler.load(trained_save_dir)


def sample_main(capsys, *args):
    """(stdout, stderr) of sample.py's main run in here, which must succeed."""
    capsys.readouterr()
    assert sample.main([*map(str, args)]) == 0
    return capsys.readouterr()


def test_a_stop_string_cuts_the_text_right_before_its_first_occurrence(sampler):
    settings = SampleSettings("the ", 4 * GENERATE_BLOCK, 1, 1.3, 4)
    full = sampler.run(settings)
    generated = full[len("the "):]
    # A stop string that spans the boundary between two blocks, and one found earlier: the first one wins.
    across = generated[GENERATE_BLOCK - 2:GENERATE_BLOCK + 3]
    first = generated.find(across)
    assert sampler.run(settings, [across]) == "the " + generated[:first]
    early = generated[40:43]
    expected_end = min(generated.find(early), first)
    assert sampler.run(settings, [across, early]) == "the " + generated[:expected_end]
    # The prime is not searched; a stop string never generated changes nothing.
    phrase = SampleSettings("the cat sat on ", 200, 1, 1.3, 4)
    phrased = sampler.run(phrase)
    assert "the cat sat on " not in phrased[15:] and sampler.run(phrase, ["the cat sat on "]) == phrased
    assert sampler.run(settings, ["\x00never"]) == full
    # Streamed, the pieces add up to the same text, and none of them holds the stop string.
    pieces = list(sampler.stream(settings, [across]))
    assert "".join(pieces) == "the " + generated[:first] and not any(across in piece for piece in pieces)


def test_of_two_stop_strings_in_one_block_the_earliest_wins_in_either_order(sampler):
    settings = SampleSettings("the ", 2 * GENERATE_BLOCK, 1, 1.3, 4)
    generated = sampler.run(settings)[len("the "):]
    # Two different strings of one length, taken from the first block: their first occurrences differ, and the
    # block's text holds both when it is searched. Whichever comes first in the text ends it, in either order.
    length = 4
    first = generated[20:20 + length]
    second = next(generated[k:k + length] for k in range(70, GENERATE_BLOCK - length)
                  if generated[k:k + length] != first)
    earliest = min(generated.find(first), generated.find(second))
    expected = "the " + generated[:earliest]
    for stops in ([first, second], [second, first]):
        assert sampler.run(settings, stops) == expected, stops
        assert "".join(sampler.stream(settings, stops)) == expected, stops

def test_stop_strings_at_word_level_cut_between_words(tmp_path_factory):
    import train
    from conftest import TINY_MODEL, make_data_dir
    root = tmp_path_factory.mktemp("words")
    save = str(root / "save")
    assert train.main(["--data_dir", make_data_dir(root / "data", "the cat sat\non the mat\n" * 40), "--save_dir",
                       save, "--word_level", *TINY_MODEL, "--num_epochs", "1", "--print_every", "100"]) == 0
    words = Sampler.load(save)
    settings = SampleSettings("the", 60, 1, 1.5, 9)
    full = words.run(settings)
    assert "\n" in full[3:]
    assert words.run(settings, ["\n"]) == full[:full.index("\n", 3)]


def test_several_samples_are_distinct_and_each_repeats_with_its_seed(sampler):
    settings = SampleSettings("the ", 2 * GENERATE_BLOCK + 10, 1, 1.2, 40)
    samples = sampler.run_many(settings, 4)
    assert [seed for seed, _ in samples] == [40, 41, 42, 43]
    texts = [text for _, text in samples]
    assert len(set(texts)) == 4 and all(len(text) == 4 + 2 * GENERATE_BLOCK + 10 for text in texts)
    assert sampler.run_many(settings, 4) == samples  # repeatable
    for seed, text in samples:  # and each one is the sample of its seed alone
        assert sampler.run(SampleSettings("the ", 2 * GENERATE_BLOCK + 10, 1, 1.2, seed)) == text
    # With stop strings, each sample ends at its own first occurrence.
    stopped = sampler.run_many(settings, 4, ["a"])
    for (_, full), (_, cut) in zip(samples, stopped):
        generated = full[4:]
        assert cut == ("the " + generated[:generated.find("a")] if "a" in generated else full)


def test_sample_py_prints_each_sample_after_a_line_naming_it_and_its_seed(trained_save_dir, sampler, capsys):
    out, _ = sample_main(capsys, "--save_dir", trained_save_dir, "--prime", "the ", "-n", 30, "--seed", 5,
                         "--num_samples", 3, "--stop", "\\n")
    texts = [sampler.run(SampleSettings("the ", 30, 1, 1.0, 5 + i), ["\n"]) for i in range(3)]
    expected = "".join(f"--- sample {i + 1} of 3, seed {5 + i} ---\n{text}\n" for i, text in enumerate(texts))
    assert out == expected


def test_beam_width_1_prints_the_argmax_text_and_a_wider_beam_is_as_likely_or_more(trained_save_dir, sampler,
                                                                                      capsys):
    out, err = sample_main(capsys, "--save_dir", trained_save_dir, "--prime", "the ", "-n", 60, "--beam_width", 1)
    assert out == sampler.sample("the ", 60, mode=0) + "\n"
    greedy = float(err.split("log-probability ")[1].split()[0])
    out, err = sample_main(capsys, "--save_dir", trained_save_dir, "--prime", "the ", "-n", 60, "--beam_width", 6)
    assert out.startswith("the ") and len(out) == 4 + 60 + 1
    assert float(err.split("log-probability ")[1].split()[0]) >= greedy - 1e-3


def read_until(fd, marker, process, timeout=SPAWN_TIMEOUT_S):
    """Read from a pseudo-terminal until `marker` appears; returns everything read."""
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} within {timeout}s; read {seen!r}"
        assert process.poll() is None or select.select([fd], [], [], 0)[0], f"exited ({process.returncode}): {seen!r}"
        if select.select([fd], [], [], 0.1)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the other side closed
                break
    return seen


@pytest.mark.slow
def test_interactive_mode_at_a_terminal_answers_changes_settings_and_quits(trained_save_dir, sampler):
    main, child = pty.openpty()
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "sample.py"), "--save_dir", trained_save_dir, "-i",
                                "-n", "25", "--seed", "3"], stdin=child, stdout=child, stderr=child, close_fds=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    os.close(child)
    try:
        read_until(main, b"prime> ", process)
        os.write(main, b"the \n")
        answer = read_until(main, b"prime> ", process).decode()
        assert sampler.sample("the ", 25, 1, 1.0, 3).replace("\n", "\r\n") in answer  # the terminal writes CRLF
        assert "[seed 3]" in answer
        os.write(main, b":n 10\n")
        read_until(main, b"prime> ", process)
        os.write(main, b"a cat\n")
        answer = read_until(main, b"prime> ", process).decode()
        assert sampler.sample("a cat", 10, 1, 1.0, 3).replace("\n", "\r\n") in answer
        os.write(main, b":temperature -1\n")  # refused in one line, the loop goes on
        assert b"error: :temperature '-1'" in read_until(main, b"prime> ", process)
        os.write(main, b"\x04")  # Ctrl-D leaves
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main)


@pytest.mark.slow
def test_interactive_mode_from_a_pipe_answers_each_line(trained_save_dir, sampler):
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--save_dir", trained_save_dir, "-i",
                             "-n", "20", "--seed", "8", "--stop", "\\n"], input="the \n:n 12\non the\nZebra\n",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first = sampler.run(SampleSettings("the ", 20, 1, 1.0, 8), ["\n"])
    second = sampler.run(SampleSettings("on the", 12, 1, 1.0, 8), ["\n"])
    assert result.stdout == f"{first}\n{second}\n"
    assert "error: the prime has characters the model does not know" in result.stderr  # and it went on


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--top_p", "0"], "--top_p"),
    (["--top_p", "1.5"], "--top_p"),
    (["--top_p", "nan"], "--top_p"),
    (["--num_samples", "0"], "--num_samples"),
    (["--beam_width", "-1"], "--beam_width"),
    (["--stop", ""], "error: a stop string must not be empty"),
    (["--beam_width", "3", "--num_samples", "2"], "error: --beam_width finds one continuation"),
    (["--beam_width", "5000"], "error: the beam width must be an integer from 1 to 1024"),
    (["-i", "--num_samples", "2"], "error: -i answers one sample a prime"),
])
def test_bad_new_flags_exit_2_with_one_line(trained_save_dir, args, message):
    result = run_script("sample.py", "--save_dir", trained_save_dir, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1]
    if message.startswith("error: "):
        assert len(lines) == 1, result.stderr
    assert result.stdout == ""


# Run in a fresh interpreter: sample.main() with each flag list, then whether TensorFlow was ever imported.
MAIN_WITHOUT_TENSORFLOW = """
import json, sys
sys.path.insert(0, sys.argv[1])
import sample
results = []
for args in json.loads(sys.argv[2]):
    results.append(sample.main(args))
print(json.dumps({"codes": results, "tensorflow": "tensorflow" in sys.modules}))
"""


@pytest.mark.slow
def test_flags_wrong_on_their_face_are_refused_before_tensorflow_loads(tmp_path):
    flag_lists = [["--beam_width", "10000"], ["--stop", ""], ["-n", str(2 ** 30 + 1)], ["--top_k", str(2 ** 32)],
                  ["--seed", str(2 ** 63)], ["--beam_width", "3", "--num_samples", "2"]]
    # No save dir there: had a flag been let through, loading the model would fail (exit 1) after TensorFlow.
    missing = str(tmp_path / "no-save-dir")
    argv = [["--save_dir", missing, *flags] for flags in flag_lists]
    result = subprocess.run([sys.executable, "-c", MAIN_WITHOUT_TENSORFLOW, REPO, json.dumps(argv)],
                            capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome == {"codes": [2] * len(flag_lists), "tensorflow": False}, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(flag_lists) and all(line.startswith("error: ") for line in lines), lines


class EchoSampler:
    """A stand-in for Sampler that answers each prime with itself, and counts the primes it was given."""

    def __init__(self):
        self.primes = []

    def stream(self, settings, stops=()):
        self.primes.append(settings.prime)
        yield settings.prime


def test_interactive_mode_refuses_a_prime_over_the_servers_limit_in_one_line_and_goes_on():
    echo, out, err = EchoSampler(), io.StringIO(), io.StringIO()
    longest, too_long = "a" * MAX_PRIME, "b" * (MAX_PRIME + 1)
    lines = io.StringIO(f"{too_long}\n{longest}\nthe\n" + "c" * 1_000_000 + "\n")
    assert interactive.loop(echo, SampleSettings(n=5, seed=1), [], lines, out, err) == 0
    assert echo.primes == [longest, "the"]  # the long ones never reach the model
    assert out.getvalue() == f"{longest}\nthe\n"
    refusals = err.getvalue().splitlines()
    assert refusals == [f"error: the prime is {MAX_PRIME + 1} characters long; the limit is {MAX_PRIME}",
                        f"error: the prime is 1000000 characters long; the limit is {MAX_PRIME}"]


def test_help_lists_the_new_flags():
    result = run_script("sample.py", "--help")
    for flag in ("--top_p", "--stop", "--num_samples", "--beam_width", "--interactive"):
        assert flag in result.stdout
