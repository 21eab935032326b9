"""Safe building of one prepared dir under <cache_dir>/: a lock per key and self-cleaning temp dirs.

Several processes (ranks, concurrent runs) may ask for the same dataset at once. Each key has
a lock file `.<key>.lock` (fcntl.flock, released by the kernel when its holder dies), so one
process builds while the others wait and then reuse its result. A build happens in a temp dir
`.<key>.tmp-XXXX` that is removed on any error, on SIGTERM and on SIGINT; temp dirs whose key
is not locked were left by a killed process (SIGKILL, power loss) and are removed at the next
prepare. Nothing here ever deletes a finished dataset dir.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"


def lock_path(root: Path, key: str) -> Path:
    return root / f".{key}.lock"


@contextmanager
def key_lock(root: Path, key: str) -> Iterator[None]:
    """Hold the exclusive lock of `key`; says so when it has to wait for another process."""
    with open(lock_path(root, key), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"data: waiting for another process preparing {root / key}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_temp_dirs(root: Path, held_key: str | None = None) -> list[Path]:
    """Remove temp dirs of `held_key` (its lock is ours) and of any key nobody holds the lock of.

    A cache dir we cannot write to (a shared read-only cache) is left alone.
    """
    removed = []
    for tmp in sorted(root.glob(f".*{TMP_MARK}*")):
        key = tmp.name[1:].rsplit(TMP_MARK, 1)[0]
        try:
            with open(lock_path(root, key), "a") as f:
                if key != held_key:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live build
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        except OSError:  # BlockingIOError included
            continue
    return removed


@contextmanager
def temp_dir(root: Path, key: str) -> Iterator[Path]:
    """A fresh temp dir for building `key`, removed when the block ends however it ends."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}{TMP_MARK}", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would stick to the final dir
    try:
        with _exit_on_signals(tmp):
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _exit_on_signals(tmp: Path) -> Iterator[None]:
    """On SIGTERM / SIGINT remove `tmp`, then hand the signal to the handler that was there before (train.py's
    set-up handler requeues a preempted SLURM job), then exit with 128 + signal.

    SIGTERM's default action kills the process without running any Python cleanup. The handler
    removes the temp dir itself and leaves with os._exit: a SystemExit raised from a handler is
    swallowed (exit code 0, build continuing) when the signal lands in a weakref or __del__
    callback. Handlers can only be set from the main thread; elsewhere the caller's own handling
    applies.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        print(f"data: {signal.Signals(signum).name} during data preparation; removing the partial dataset",
              file=sys.stderr, flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
        handler = previous.get(signum)
        if callable(handler) and handler is not signal.default_int_handler:  # that one raises KeyboardInterrupt
            handler(signum, frame)
        os._exit(128 + signum)

    previous = {s: signal.signal(s, leave) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def discard(path: Path) -> None:
    """Move a damaged dataset dir out of the way (atomic), then delete it."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}damaged-", dir=path.parent))
    os.rename(path, aside / path.name)
    shutil.rmtree(aside, ignore_errors=True)
