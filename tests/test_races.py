"""Concurrent readers and writers of one run: two writers of one file, an eval of a run whose
trainer prunes the checkpoint the eval just resolved."""
from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

from trainer.rundir import write_atomic

TEXTS = [f"{w}\n" * 2000 for w in ("alpha", "beta")]  # 12 kB each: each write takes a while


def _write_many(path: str, text: str, n: int) -> None:
    for _ in range(n):
        write_atomic(Path(path), text)


def _check_whole(path: Path) -> None:
    assert path.read_text() in TEXTS  # the last rename's file, whole
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_two_threads_writing_one_file_never_fail(tmp_path):
    path = tmp_path / "result.json"
    errors = []

    def run(text):
        try:
            _write_many(str(path), text, 200)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in TEXTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _check_whole(path)


def test_two_processes_writing_one_file_never_fail(tmp_path):
    path = tmp_path / "metrics.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(path), t, 200)) for t in TEXTS]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    _check_whole(path)


def test_written_file_has_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
