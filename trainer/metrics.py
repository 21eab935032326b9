"""metrics.jsonl: one JSON row per training step, plus eval and sink rows; mirrored to the tracker when on
(logging.tracker, through Accelerate), namespaced train/, val/ and sink/ as the trackers' dashboards group them."""
from __future__ import annotations

import json
import math
import os
import secrets
import warnings
from pathlib import Path

from util import write_atomic


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


def tracker_row(row: dict) -> dict:
    """A metrics.jsonl row as a tracker logs it: numbers only, under train/, val/ or sink/ by the row's split
    (loss -> train/loss, val_loss -> val/loss, sink_1 -> sink/sink_1); step is the tracker's step."""
    split = row.get("split", "train")
    return {f"{split}/{k.removeprefix('val_') if split == 'val' else k}": v for k, v in row.items()
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsLog:
    """Rows go to <run>/metrics.jsonl (main process only) and to Accelerate's trackers (wandb)."""

    def __init__(self, acc, run_dir: Path, tracker: str | None):
        self.acc, self.path, self.tracker = acc, run_dir / "metrics.jsonl", tracker
        self.failure = None  # the OSError of a failed append (disk full): the loop stops at the end of the step

    def write(self, row: dict) -> None:
        if self.acc.is_main_process and self.failure is None:
            finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            line = json.dumps(finite) + "\n"  # non-finite floats as null: the file stays valid JSON
            try:
                with open(self.path, "a") as f:
                    f.write(line)
            except OSError as e:
                self.failure = e
                self.cut_torn_line()
        if self.tracker:
            self.acc.log(tracker_row(row), step=row["step"])

    def cut_torn_line(self) -> None:
        """After a failed append, cut the file back to its last complete row (a no-op when the write left nothing)."""
        try:
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                os.truncate(self.path, data.rfind(b"\n") + 1)
        except OSError:
            pass  # the torn line is dropped with a warning when the file is next read

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
