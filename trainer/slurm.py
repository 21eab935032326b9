"""Requeue a SLURM job that was stopped by SIGTERM (time limit, preemption), as submitit does.

SLURM sends SIGTERM before the kill (configs/slurm/train.sbatch asks for it 120 s ahead with
--signal); train.py saves a checkpoint, then the main process calls `scontrol requeue`, and the
requeued job continues with train.resume=auto. SIGINT never requeues: stop a job for good with
`scancel --signal=INT <job id>` (it saves and exits) or plain `scancel` twice.
"""
from __future__ import annotations

import os
import subprocess


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
