"""Every eval output is written to a temp file and renamed: a process killed in the middle of
writing a JSON, markdown or PNG result leaves the previous file or the new one, never a torn one.
The write is slowed down (a few bytes at a time) so the kill lands mid-write, which is checked."""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

import eval as ev
from eval.plots import save, subplots

PNG_END = b"IEND\xaeB`\x82"  # the last chunk of every complete PNG


def slow_writes():
    """Make Path.write_text and matplotlib's savefig write 64 bytes at a time with a pause."""
    import io

    import matplotlib.figure

    def trickle(path, data: bytes):
        with open(path, "wb") as f:
            for i in range(0, len(data), 64):
                f.write(data[i : i + 64])
                f.flush()
                time.sleep(0.002)

    savefig = matplotlib.figure.Figure.savefig

    def slow_savefig(fig, fname, **kw):
        buf = io.BytesIO()
        savefig(fig, buf, **kw)
        trickle(fname, buf.getvalue())

    Path.write_text = lambda self, text, *a, **kw: trickle(self, text.encode())
    matplotlib.figure.Figure.savefig = slow_savefig


def figure(n_points: int):
    fig, axes = subplots(1, 1)
    axes[0, 0].plot(range(n_points), [i % 7 for i in range(n_points)], marker="o")
    return fig


WRITERS = {
    "json": lambda path, new: ev.write_json(path, {"rows": list(range(4000)) if new else [1, 2, 3]}),
    "md": lambda path, new: ev.write_text(path, ("| a | b |\n" * 4000) if new else "| old |\n"),
    "png": lambda path, new: save(figure(400 if new else 3), path),
}


def child(kind: str, path: str, started) -> None:
    slow_writes()
    started.set()
    WRITERS[kind](Path(path), True)
    os._exit(0)


def intact(kind: str, path: Path, old: bytes) -> str:
    """"old" or "new" when the file is one of the two complete versions; fails otherwise."""
    data = path.read_bytes()
    if data == old:
        return "old"
    if kind == "json":
        rows = json.loads(data)["rows"]
        assert rows in ([1, 2, 3], list(range(4000)))
        return "old" if rows == [1, 2, 3] else "new"
    if kind == "md":
        text = data.decode()
        assert text in ("| old |\n", "| a | b |\n" * 4000)
        return "old" if text == "| old |\n" else "new"
    assert data.startswith(b"\x89PNG") and data.endswith(PNG_END)
    return "new"


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_kill_mid_write_leaves_the_old_file(kind, tmp_path):
    target = tmp_path / f"result.{kind}"
    WRITERS[kind](target, False)
    old = target.read_bytes()
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    proc = ctx.Process(target=child, args=(kind, str(target), started))
    proc.start()
    assert started.wait(10)
    def temps():  # write_atomic's temp files: unique per write, hidden, beside the target
        return list(tmp_path.glob(f".{target.name}.*.tmp"))

    deadline = time.time() + 10
    while not (temps() and temps()[0].stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.005)  # the new version is being written next to the old one
    proc.kill()
    proc.join()
    assert len(temps()) == 1 and proc.exitcode == -9, "the kill did not land mid-write"
    [temp] = temps()
    assert 0 < temp.stat().st_size, "nothing was written before the kill"
    assert intact(kind, target, old) == "old"
    WRITERS[kind](target, True)  # the next write replaces the file and leaves no temp of its own
    assert intact(kind, target, old) == "new" and temps() == [temp]  # the killed writer's stays, hidden
