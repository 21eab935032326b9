"""One training process per run dir: an exclusive lock on out/<run>/.lock, held by the main process.

Two train.py on the same name would interleave checkpoints and metrics rows. The lock is an
fcntl.flock, so the kernel drops it when the holder dies however it dies (no stale locks to clear
by hand); the file keeps the holder's pid so the refusal can name it.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from configs import ConfigError


class RunLock:
    def __init__(self, run_dir: Path):
        """Take the lock or raise ConfigError naming the holder; creates the run dir and .lock only."""
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(f"{run_dir} is in use by another training process (pid {holder}); wait for it to "
                              "finish or stop it, or use name=<new name> for a separate run") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
