"""The plain progress line printed every logging.log_interval steps when there is no progress bar
(logging.progress=false, or output going to a file or a pipe: ablate.py's runs, Slurm logs)."""
from __future__ import annotations


def duration(seconds: float) -> str:
    """1h02m, 3m07s, 42s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(step: int, max_steps: int, loss: float, lr: float, tok_s: float, seconds_per_step: float) -> str:
    """'step 20/600 | loss 3.2104 | lr 1.00e-03 | 12,345 tok/s | ETA 4m10s'."""
    eta = duration(seconds_per_step * (max_steps - step))
    return f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | ETA {eta}"
