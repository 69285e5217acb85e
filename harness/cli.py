"""The command line: knobs from a config dataclass as --flags, one-line errors instead of tracebacks, Ctrl-C that
stops at a step boundary. A reader of the method may skip this file: it holds no rule of the paper."""

import argparse
import contextlib
import dataclasses
import math
import re
import sys

import torch


@contextlib.contextmanager
def oom_hint(knobs):
    """A CUDA out-of-memory error becomes one line that names the knobs to lower (checkpoints are kept)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(
            f"CUDA out of memory: lower {knobs} (or keep --gradient-checkpointing 1)"
        ) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other bad input of these scripts."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main, argv=None):
    """Run a script's main: a bad input (data, path, value, missing package) ends as one line 'error: ...' and exit
    status 1, never a traceback; Ctrl-C ends as one line and exit status 130."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        sys.exit("error: " + " ".join(str(e).split()))


def knob_notes(config_class):
    """{field: (help, rule or None)} from the comments beside a config dataclass's fields, '# help | rule'. The rule
    is text for --help and error messages ('v >= 1'); the check itself is the script's RANGES (check_ranges)."""
    import inspect

    notes = {}
    for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(config_class), re.M):
        text, _, rule = m[2].partition(" | ")
        notes[m[1]] = (text.strip(), rule.strip() or None)
    return notes


def check_ranges(cfg, ranges):
    """Every knob that is set is finite (no inf or nan) and passes its test in `ranges` ({field: v -> bool}); one
    line that names the flag and the rule of its comment otherwise."""
    notes = knob_notes(type(cfg))
    for f in dataclasses.fields(cfg):
        v, flag, ok = getattr(cfg, f.name), "--" + f.name.replace("_", "-"), ranges.get(f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{flag} {v}: must be a finite number")
        if v is not None and ok and not isinstance(v, bool) and not ok(v):
            rule = notes.get(f.name, ("", None))[1] or "its range (see --help)"
            raise ValueError(f"{flag} {v}: out of range, must satisfy {rule}")


def text_arg(value):
    """argparse type of a text flag: an empty value is an error, not a silent default."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def dataclass_args(config_class, argv=None, description=None):
    """The fields of a config dataclass as --flags, the comment beside each field as its help and range (see
    knob_notes); a list field is a repeatable flag. Only the flags given are recorded (cfg._set), so a resume keeps
    the rest. Values are range-checked by check_ranges once the defaults are resolved."""
    notes = knob_notes(config_class)
    p = ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(config_class):
        flag, (text, spec) = "--" + f.name.replace("_", "-"), notes.get(f.name, ("", None))
        text = text.replace("%", "%%")  # argparse formats help strings with %
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        p.add_argument(
            flag,
            type={"int": int, "float": float}.get(kind, text_arg),
            default=argparse.SUPPRESS,
            action="append" if kind == "list" else "store",
            metavar=f.name.upper(),
            help=f"{text} (default: {f.default}{'; valid: ' + spec if spec else ''})",
        )
    given = vars(p.parse_args(argv))
    cfg = config_class(**given)
    cfg._set = set(given)
    return cfg


class StopAfterStep:
    """Ctrl-C asks the loop to stop at the end of the current step, so the checkpoint it saves is a clean step
    boundary; a second Ctrl-C stops at once."""

    def __enter__(self):
        import signal
        import threading

        self.requested, self._signal = False, signal
        main_thread = threading.current_thread() is threading.main_thread()
        self._old = signal.signal(signal.SIGINT, self._handle) if main_thread else None
        return self

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    def __exit__(self, *exc):
        if self._old is not None:
            self._signal.signal(self._signal.SIGINT, self._old)
