"""Ctrl-C in an eval is one line on stderr and exit code 130, not a traceback. The eval is stopped at a
known point: it blocks reading a metrics.jsonl that is a FIFO, which the test can see (a writer can
open a FIFO only while its reader has it open) before it sends SIGINT."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["-m", "eval.spikes"], ["-m", "eval", "spikes"]])
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, command):
    run = tmp_path / "run"
    run.mkdir()
    fifo = run / "metrics.jsonl"
    os.mkfifo(fifo)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, *command, "--run", str(run)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:  # until the eval has the FIFO open for reading: it is inside main(), blocked on it
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:
            assert e.errno == errno.ENXIO and proc.poll() is None and time.monotonic() < deadline, proc.poll()
            time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        os.close(fd)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0], err
