"""A write that fails in the middle of a run (disk full, quota, a read-only remount) stops it with one line
naming the disk and the last good checkpoint, not a library's traceback.

torch.save reports a full disk as `RuntimeError: [enforce fail at inline_container.cc:...]` (its zip writer),
safetensors and plain writes as OSError; both count as a failed write here.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

TORCH_WRITE_ERRORS = ("inline_container", "file write failed", "PytorchStreamWriter")


class WriteFailed(Exception):
    """A checkpoint or metrics write did not reach the disk; str() is the one line for the user."""


def is_write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in TORCH_WRITE_ERRORS))


def mount_of(path: Path) -> Path:
    """The mount point of the file system holding `path` (its nearest existing ancestor)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def describe_failure(what: str, path: Path, e: BaseException, last_good: Path | None) -> str:
    """One line: what could not be written where, the disk and its free space, the last good checkpoint."""
    mount = mount_of(path)
    free = shutil.disk_usage(mount).free
    reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [type(e).__name__])[0]
    good = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
    return (f"cannot write {what} to {path} ({reason}); the disk holding it ({mount}) has {free / 2**30:.2f} GiB "
            f"free. Free space there (or move out_dir) and continue with train.resume=auto: {good}")
