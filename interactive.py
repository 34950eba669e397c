"""sample.py -i: primes read in a loop, each answered as it is generated, with the model loaded once.

At a terminal it prompts, shows each answer's seed, keeps a line history (readline) and takes commands that change
the settings; Ctrl-D or Ctrl-C (or :quit) leaves. From a pipe it reads one prime a line and prints each answer on
its own line(s), without prompts. The commands (a line starting with ":"):

    (each sampling setting of settings.SETTINGS but the prime and logprobs, by its flag's name)
    :n 200   :sample 0|1|2   :temperature 0.8   :seed 7 | :seed random   :top_k 5   :top_p 0.9
    :frequency_penalty 0.5   :presence_penalty 0.5
    :stop TEXT (add a stop string; \\n is a line break)   :stop (clear them)   :settings   :help   :quit

A prime longer than the server's default limit (settings.MAX_PRIME characters) is refused in one line.
"""
import argparse
import dataclasses
import sys

import cli
from settings import MAX_PRIME, SETTINGS, pick_seed

PROMPT = "prime> "
# Each settable field by its :command (its sample.py flag's name; the prime is a line of its own): the setting
# declared in settings.SETTINGS, read as its flag is (the sampler checks the ranges).
# logprobs is left out: -i prints text only (sample.py reports logprobs with --json).
FIELDS = {setting.flag.lstrip("-"): setting for setting in SETTINGS if setting.name not in ("prime", "logprobs")}


def usage(command, setting):
    if setting.choices is not None:
        return f":{command} " + "|".join(map(str, setting.choices))
    return f":{command} {command.split('_')[-1][0].upper()}" + ("|random" if setting.name == "seed" else "")


HELP = ("  ".join(usage(command, setting) for command, setting in FIELDS.items())
        + "  :stop TEXT|(none)  :settings  :help  :quit   (anything else is a prime)")


class Session:
    """The settings of the loop and the sampler that answers."""

    def __init__(self, sampler, settings, stops, out=sys.stdout, err=sys.stderr):
        self.sampler, self.settings, self.stops = sampler, settings, list(stops)
        self.out, self.err = out, err

    def command(self, line):
        """Apply a ":name value" command; returns False for :quit. Bad commands are one line on stderr."""
        name, _, value = line[1:].strip().partition(" ")
        value = value.strip()
        if name in ("quit", "q", "exit"):
            return False
        if name == "help":
            print(HELP, file=self.err)
        elif name == "settings":
            print(self.describe(), file=self.err)
        elif name == "stop":
            self.stops = [cli.escaped_text(value)] + self.stops if value else []
            print(f"stop strings: {self.stops!r}", file=self.err)
        elif name in FIELDS:
            self.set(name, value)
        else:
            print(f"error: unknown command :{name}; {HELP}", file=self.err)
        return True

    def set(self, name, value):
        setting = FIELDS[name]
        try:
            parsed = None if setting.name == "seed" and value == "random" else setting.parse(value)
            if setting.choices is not None and parsed not in setting.choices:
                raise ValueError(f"{setting.http.replace('_', ' ')} must be one of "
                                 f"{', '.join(map(str, setting.choices))}")
            self.settings = dataclasses.replace(self.settings, **{setting.name: parsed})
        except (ValueError, argparse.ArgumentTypeError) as e:  # one line, and the loop goes on
            print(f"error: :{name} {value!r}: {e}", file=self.err)
            return
        print(self.describe(), file=self.err)

    def describe(self):
        shown = {setting.name: getattr(self.settings, setting.name) for setting in FIELDS.values()}
        shown["seed"] = "random" if shown["seed"] is None else shown["seed"]
        return ", ".join([*(f"{command} {shown[setting.name]}" for command, setting in FIELDS.items()),
                          f"stops {self.stops!r}"])

    def answer(self, prime, show_seed):
        """Generate for one prime, writing the text as it comes; a bad prime or setting is one line on stderr."""
        if len(prime) > MAX_PRIME:  # the server's limit: a long prime takes one step per token to feed
            print(f"error: the prime is {len(prime)} characters long; the limit is {MAX_PRIME}", file=self.err)
            return
        seed = pick_seed() if self.settings.seed is None else self.settings.seed
        settings = dataclasses.replace(self.settings, prime=prime, seed=seed)
        try:
            for piece in self.sampler.stream(settings, self.stops):
                self.out.write(piece)
                self.out.flush()
        except ValueError as e:
            print(f"error: {e}", file=self.err)
            return
        self.out.write("\n")
        self.out.flush()
        if show_seed:
            print(f"[seed {seed}]", file=self.err)


def loop(sampler, settings, stops, stdin=sys.stdin, out=sys.stdout, err=sys.stderr):
    """Answer primes from stdin until end of input, :quit or Ctrl-C; returns the exit code (0)."""
    session = Session(sampler, settings, stops, out, err)
    at_terminal = stdin.isatty()
    if at_terminal:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"model loaded: type a prime and Enter; {HELP}; Ctrl-D to leave", file=err)
    try:
        while True:
            if at_terminal:
                try:
                    line = input(PROMPT)
                except EOFError:
                    out.write("\n")
                    return 0
            else:
                line = stdin.readline()
                if not line:
                    return 0
                line = line[:-1] if line.endswith("\n") else line
            if line.startswith(":"):
                if not session.command(line):
                    return 0
                continue
            session.answer(line, show_seed=at_terminal)
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        return 0
