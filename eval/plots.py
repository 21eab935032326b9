"""Matplotlib helpers shared by the evals: headless (Agg) backend, one place to save figures."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # evals run on servers and in tests: never open a window
import matplotlib.pyplot as plt  # noqa: E402


def subplots(nrows: int = 1, ncols: int = 1, width: float = 6.0, height: float = 4.0, **kw):
    """Figure sized per panel, so multi-panel plots stay readable."""
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)


def save(fig, path) -> Path:
    """Save to a temp file in the same folder, then rename: a kill mid-write leaves the old plot."""
    from util import temp_beside

    path = Path(path)
    tmp = temp_beside(path)  # unique: two evals saving one plot never collide
    fig.tight_layout()
    try:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
