"""Evaluations of trained runs (docs/design.md, "Evals"): `python -m eval.<name> --ckpt out/<run>`.

The evaluations are sink, backcopy, spikes, streaming, activations, quantize, vit_artifacts and harness
(lm-eval). Each has pure metric functions on tensors / lists, one library function returning a
result dataclass (eval/result.py; `evaluate(...)` for most) and a thin `main(argv=None)` CLI that
writes its JSON + PNG under `<run>/eval/`. What the CLIs share: cli.py (flags, loading each
checkpoint, output dirs, the over-steps summary) and plots.py; sink_positions.py is a part of sink.
This file holds the few helpers they share; it imports nothing heavy so `python -m eval.spikes`
stays light.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path


def fail(msg: str):
    """A user error in an eval CLI: one line on stderr, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def run_main(main, *args) -> None:
    """What `python -m eval.<name>` runs: main(*args), with Ctrl-C as one line and exit code 130 (128 + SIGINT,
    the shell's code for it) instead of a traceback from wherever the eval was."""
    try:
        main(*args)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): the eval stopped; the outputs it finished before are kept", file=sys.stderr)
        raise SystemExit(130) from None


def make_dir(path) -> Path:
    """Create an output folder, or fail with one line when the run dir cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror or e}); copy the run to a writable place and evaluate the copy")
    return path


def check_writable(path, flag: str = "--out") -> Path:
    """Fail in one line, before any work, when `path` (a folder, made later) cannot be written: a file is
    there, or the nearest existing folder refuses a new entry (tried with a temp folder, removed at once:
    permission bits alone say nothing to root or on /proc)."""
    import tempfile

    path = Path(path)
    if path.exists() and not path.is_dir():
        fail(f"{flag} {path} is a file, not a folder; pass a folder")
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir():
        fail(f"{flag} {path}: {parent} is a file, not a folder; pass a writable folder")
    try:
        Path(tempfile.mkdtemp(dir=parent, prefix=".write_check_")).rmdir()
    except OSError as e:
        fail(f"{flag} {path} cannot be written ({e.strerror or e} in {parent}); pass a writable folder")
    return path


def eval_dir(run_dir, tag: str | None = None) -> Path:
    """`<run>/eval/`, or `<run>/eval/<tag>/` with --tag, created on demand: every eval writes its outputs there."""
    return make_dir(Path(run_dir) / "eval" / (tag or ""))


# Outputs never replace a differently configured result: each JSON records the eval's flags
# (`flags_of`), and an eval whose output JSON holds other flags stops before any work
# (`keep_other_result`), naming --tag, which writes under <eval dir>/<tag>/ instead.
NOT_FLAGS = ("ckpt", "device", "tag")  # where and on what it ran, not how: never part of a result's flags


def tag_name(text: str) -> str:
    """argparse type of --tag: one folder name."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"{text!r} must be a folder name: letters, digits, '.', '_', '-'")
    return text


def add_tag_argument(ap) -> None:
    ap.add_argument("--tag", type=tag_name, default=None,
                    help="write the outputs under <eval dir>/TAG/ (default: <eval dir>/ itself); an eval refuses to "
                         "replace a result made with other flags, so name differently configured evals apart")


def flags_of(args, paths: tuple[str, ...] = ()) -> dict:
    """The eval's options as its JSON records them (without the paths it read, the device and --tag)."""
    return json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in (*NOT_FLAGS, *paths)}))


def with_flags(data: dict, flags: dict) -> dict:
    """A result's JSON with the flags that made it (and their definition)."""
    defs = {**data.get("definitions", {}), "flags": "the eval's options (not the checkpoint paths, device or --tag); "
                                                     "an eval refuses to replace a result of other flags"}
    return {**data, "flags": flags, "definitions": defs}


def keep_other_result(path, flags: dict) -> None:
    """Stop (one line, exit 2) when `path` holds a result made with other flags; the same flags replace it."""
    path = Path(path)
    try:
        old = json.loads(path.read_text()).get("flags") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        old = None  # unreadable or not ours: nothing to compare (the write replaces it atomically)
    if old is None or old == flags:
        return
    diff = [k for k in sorted(set(old) | set(flags)) if old.get(k) != flags.get(k)]
    said = "; ".join(f"{k}: {old.get(k)!r} there, {flags.get(k)!r} now" for k in diff[:3])
    fail(f"{path} holds a result made with other flags ({said}); pass --tag NAME to write this one under "
         f"{path.parent}/NAME/ and keep both, or remove {path.name} to replace it")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with every flag's default (the description as written): appended where the help does not
    say it already; flags without a default (None, off) stay as written."""

    @staticmethod
    def _shows_default(action) -> bool:
        d = action.default
        return bool(action.option_strings) and d is not None and d is not False and d != argparse.SUPPRESS \
            and not (isinstance(d, (list, tuple, str)) and len(d) == 0)

    def _format_action(self, action):
        if action.help is None and self._shows_default(action):
            action = copy.copy(action)  # a flag without help text still shows its default
            action.help = "default: " + (" ".join(map(str, action.default)) if isinstance(action.default, (list, tuple))
                                         else "%(default)s")
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not self._shows_default(action):
            return text
        shown = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})".lstrip()


# argparse types: a bad flag is refused when the command line is parsed, before any work.
def _number(kind, text: str, ok, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v > 0, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0, "a positive finite number")


def nonnegative_float(text: str) -> float:
    return _number(float, text, lambda v: v >= 0, "a finite number >= 0")


def unit_float(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _json_safe(obj):
    """NaN/inf are not JSON; write them as null so any JSON reader can load the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_text(path, text: str) -> Path:
    """Write a whole file atomically (temp file, then rename): a kill or a full disk mid-write
    leaves the previous file, never a truncated one."""
    from util import write_atomic

    path = Path(path)
    write_atomic(path, text)
    return path


def write_json(path, data: dict) -> Path:
    return write_text(path, json.dumps(_json_safe(data), indent=2) + "\n")
