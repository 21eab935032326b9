"""metrics.jsonl: one JSON row per training step, plus eval and sink rows; mirrored to wandb when on."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .checkpoint import write_atomic


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
        """Drop rows logged after `step`: a resumed run redoes them (0 = a fresh start)."""
        if self.acc.is_main_process and self.path.exists():
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            keep = [r for r in rows if json.loads(r).get("step", 0) <= step]
            write_atomic(self.path, "".join(r + "\n" for r in keep))
