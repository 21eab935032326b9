"""Evaluations of trained runs (docs/design.md, "Evals"): `python -m eval.<name> --ckpt out/<run>`.

The evaluations are sink, backcopy, spikes, streaming, activations, quantize, vit_artifacts and harness
(lm-eval). Each has pure metric functions on tensors / lists, one library function returning a
result dataclass (eval/result.py; `evaluate(...)` for most) and a thin `main(argv=None)` CLI that
writes its JSON + PNG under `<run>/eval/`. What the CLIs share: cli.py (flags, loading each
checkpoint, output dirs, the over-steps summary) and plots.py; sink_positions.py is a part of sink.
eval/bench/ only keeps `python -m eval.bench` working (the benchmarks are the package bench/).
This file holds the few helpers they share; it imports nothing heavy so `python -m eval.spikes`
stays light.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def fail(msg: str):
    """A user error in an eval CLI: one line on stderr, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def make_dir(path) -> Path:
    """Create an output folder, or fail with one line when the run dir cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror or e}); copy the run to a writable place and evaluate the copy")
    return path


def eval_dir(run_dir) -> Path:
    """`<run>/eval/`, created on demand: every eval writes its outputs there."""
    return make_dir(Path(run_dir) / "eval")


# argparse types: a bad flag is refused when the command line is parsed, before any work.
def _number(kind, text: str, ok, what: str):
    import argparse

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
    from trainer.rundir import write_atomic

    path = Path(path)
    write_atomic(path, text)
    return path


def write_json(path, data: dict) -> Path:
    return write_text(path, json.dumps(_json_safe(data), indent=2) + "\n")


def pick_device(name: str | None = None):
    """`name` (cuda, cuda:1, cpu, mps), refused with the fix when this machine lacks it; default cuda if present."""
    import torch

    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"--device {name!r} is not a device name; use cpu or cuda") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name} but this machine has no CUDA GPU; use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {name} but MPS is not available here; use --device cpu")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
