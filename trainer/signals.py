"""Stop signals: SIGTERM / SIGINT finish the step, save and exit; under SLURM a SIGTERM also requeues.

During set-up (data prep, model build, loading a checkpoint) there is nothing trained to save:
`exit_during_setup` leaves at once with 128 + signal, after requeueing a SIGTERM under SLURM, so a
job preempted in any phase goes back in the queue. Data prep's own handler removes its partial
dataset first and then calls this one.

Under SLURM the main process runs `scontrol requeue $SLURM_JOB_ID` after the save, so a job stopped by
SIGTERM (time limit, preemption) goes back in the queue.

SLURM sends SIGTERM before the kill (configs/slurm/train.sbatch asks for it 120 s ahead with
--signal); train.py saves a checkpoint, then the main process calls `scontrol requeue`, and the
requeued job continues with train.resume=auto. SIGINT never requeues: stop a job for good with
`scancel --signal=INT <job id>` (it saves and exits) or plain `scancel` twice.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys


def requeue_if_slurm(signal_name: str | None) -> str | None:
    """Call `scontrol requeue $SLURM_JOB_ID` when running under SLURM and the stop was SIGTERM.

    Returns what happened, for the run's last message; None when no requeue applies."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or signal_name != "SIGTERM":
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not requeue SLURM job {job} ({e}); resubmit it to continue"
    if done.returncode != 0:
        return f"could not requeue SLURM job {job} (scontrol: {done.stderr.strip()}); resubmit it to continue"
    return f"requeued SLURM job {job}"


UNDO_SETUP: list = []  # callables that remove what set-up wrote so far; run before a set-up exit


def exit_during_setup() -> dict:
    """Until StopFlag takes over: SIGTERM / SIGINT exit at once (nothing trained to save yet), after the
    UNDO_SETUP callables removed what set-up wrote; a SIGTERM under SLURM requeues the job first (the main
    process, RANK 0, only). Returns the handlers it replaced."""

    def leave(signum, frame):
        name = signal.Signals(signum).name
        print(f"received {name} during set-up, before any step: nothing to save", file=sys.stderr, flush=True)
        for undo in UNDO_SETUP:
            try:
                undo()
            except OSError as e:  # never keeps the exit from happening
                print(f"could not remove what set-up wrote ({e})", file=sys.stderr, flush=True)
        if os.environ.get("RANK", "0") == "0" and (requeued := requeue_if_slurm(name)):
            print(requeued, file=sys.stderr, flush=True)
        os._exit(128 + signum)  # a SystemExit raised here can be swallowed (a handler inside a weakref callback)

    return {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGINT)}


class StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and exit at the end of the current step."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.signal_name = signal.Signals(signum).name
