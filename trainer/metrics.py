"""metrics.jsonl: one JSON row per training step, plus eval and sink rows; mirrored to wandb when on."""
from __future__ import annotations

import json
import math
import secrets
import warnings
from pathlib import Path

from .rundir import write_atomic


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl. A torn last line (the writer was killed mid-row) is dropped with a
    warning; a bad line anywhere else raises ValueError naming the file and the line."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropping the torn last line ({line[:40]!r}...)", stacklevel=2)
                break
            raise ValueError(f"{path} line {i + 1} is not JSON ({e}); remove or repair that line") from None
    return rows


class MetricsLog:
    """Rows go to <run>/metrics.jsonl (main process only) and to Accelerate's trackers (wandb)."""

    def __init__(self, acc, run_dir: Path, wandb: bool):
        self.acc, self.path, self.wandb = acc, run_dir / "metrics.jsonl", wandb

    def write(self, row: dict) -> None:
        if self.acc.is_main_process:
            finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            with open(self.path, "a") as f:  # non-finite floats as null: the file stays valid JSON
                f.write(json.dumps(finite) + "\n")
        if self.wandb:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def drop_after(self, step: int) -> None:
        """Drop rows logged after `step` (and a torn last line): a resumed run redoes them (0 = a fresh start)."""
        if self.acc.is_main_process and self.path.exists():
            keep = [r for r in read_rows(self.path) if r.get("step", 0) <= step]
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def wandb_run_id(run_dir: Path) -> str:
    """The run's W&B id, made on first use and kept in <run>/wandb_run_id, so a resumed or requeued run
    continues the same W&B run (main process only)."""
    path = run_dir / "wandb_run_id"
    if not path.exists():
        write_atomic(path, secrets.token_hex(4) + "\n")
    return path.read_text().strip()
