"""What every layer shares: the dtype names, the device a command runs on, an atomic file write.
A leaf: it imports only torch and the standard library."""
from __future__ import annotations

import os
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the names configs and CLIs take
DTYPE_NAMES = {**{dtype: name for name, dtype in DTYPES.items()}, torch.float64: "fp64"}


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a hidden temp file beside `path`, then rename it over: a kill leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pick_device(name: str | None = None) -> torch.device:
    """`name` (cuda, cuda:1, cpu, mps), refused with the fix when this machine lacks it; default cuda if present."""
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
