"""Matplotlib helpers shared by the evals: headless (Agg) backend, one place to save figures."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # evals run on servers and in tests: never open a window
import matplotlib.pyplot as plt  # noqa: E402


def subplots(nrows: int = 1, ncols: int = 1, width: float = 6.0, height: float = 4.0, **kw):
    """Figure sized per panel, so multi-panel plots stay readable."""
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)


def save(fig, path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
