"""The run dir: its checkpoint layout, atomic file writes, writable before any work starts, and one
training process at a time.

Checkpoints live in out/<run>/checkpoints/step_XXXXXXX/; `latest` links to the newest. The trainer
writes them (trainer/checkpoint.py); loading a run for sampling and the evals (runs/load.py) finds
them here. The lock is exclusive on out/<run>/.lock, held by the main process.

Two train.py on the same name would interleave checkpoints and metrics rows. The lock is an
fcntl.flock, so the kernel drops it when the holder dies however it dies (no stale locks to clear
by hand); the file keeps the holder's pid so the refusal can name it.
"""
from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

import torch

from configs import ConfigError, RunConfig

CHECKPOINT_FMT = "step_{:07d}"  # out/<run>/checkpoints/step_0000600
CHECKPOINT_GLOB = "step_" + "[0-9]" * 7


def step_dirs(ckpt_root: Path) -> list[Path]:
    """The run's step_* checkpoint dirs, oldest first (a step dir only appears complete: it is renamed in)."""
    return sorted(p for p in ckpt_root.glob(CHECKPOINT_GLOB) if p.is_dir())


def newest_checkpoint(ckpt_root: Path) -> Path | None:
    """What `latest` points at when it is a link to an existing step dir, else the newest step_* on disk."""
    latest = ckpt_root / "latest"
    if latest.is_symlink() and latest.exists():
        return latest.resolve()
    found = step_dirs(ckpt_root)
    return found[-1] if found else None


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


def check_out_dir(cfg: RunConfig) -> None:
    """out_dir / name must be (or become) a folder we can write, said before any data is prepared."""
    for p in (cfg.run_dir, *cfg.run_dir.parents):  # the nearest existing ancestor
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"out_dir={cfg.out_dir!r}: {p} is a file, not a folder; set out_dir to a folder")
            if not os.access(p, os.W_OK):
                raise ConfigError(f"out_dir={cfg.out_dir!r}: {p} is not writable; set out_dir to a writable folder")
            return


def take_run_lock(cfg: RunConfig, acc) -> RunLock | None:
    """One training process per run dir: the main process takes the lock and holds it until fit() ends;
    every process learns whether it got it, so none waits in a collective for a main process that left."""
    lock, refused = None, None
    if acc.is_main_process:
        try:
            lock = RunLock(cfg.run_dir)
        except ConfigError as e:
            refused = e
    if acc.num_processes > 1 and acc.reduce(torch.tensor(float(refused is not None), device=acc.device),
                                            reduction="sum").item() > 0:
        refused = refused or ConfigError(f"{cfg.run_dir} is in use by another training process")
    if refused:
        raise refused
    return lock
