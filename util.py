"""What every layer shares: the dtype names, the device a command runs on, an atomic file write.
A leaf: it imports only torch and the standard library."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the names configs and CLIs take
DTYPE_NAMES = {**{dtype: name for name, dtype in DTYPES.items()}, torch.float64: "fp64"}


def temp_beside(path: Path) -> Path:
    """A new hidden file `.<name>.<random>.tmp` in `path`'s folder, with the permissions a plain create
    gives. Unique per call, so two writers of one file never write or rename each other's temp file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the file replaces one others may read
    os.close(fd)
    return Path(tmp)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a hidden temp file beside `path`, then rename it over: a kill leaves the old file
    whole, and of two concurrent writers the last rename wins with a whole file."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
