"""Any eval by name: `python -m eval NAME ARGS...` (the console command `sinklab-eval NAME ARGS...`) runs
what `python -m eval.NAME ARGS...` runs, e.g. `sinklab-eval sink --ckpt out/default`."""
from __future__ import annotations

import importlib
import sys

from . import run_main

EVALS = ("sink", "spikes", "streaming", "activations", "quantize", "backcopy", "interventions", "harness", "vit_artifacts",
         "dense", "vit_row")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in EVALS:
        print(f"usage: sinklab-eval {{{','.join(EVALS)}}} ARGS... (each NAME's --help lists its ARGS)",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    run_main(importlib.import_module(f"eval.{argv[0]}").main, argv[1:])  # Ctrl-C: one line, exit 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
