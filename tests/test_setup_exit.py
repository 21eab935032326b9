"""SIGTERM during set-up removes what that set-up wrote into the run dir, and nothing else."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sigterm_in_setup(argv: list[str]) -> subprocess.CompletedProcess:
    """train.main with a SIGTERM once the optimizer is made: after the lock, config.yaml and tokenizer.json."""
    script = f"""
        import os, signal, sys, time
        import train
        import trainer.loop
        def preempted(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler leaves before this ends
        trainer.loop.make_optimizer = preempted
        sys.exit(train.main({argv!r}))
        """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)


def test_sigterm_in_setup_removes_a_run_dir_it_created(tmp_path, tiny_run_args):
    done = sigterm_in_setup([*tiny_run_args(1), f"out_dir={tmp_path / 'out'}", "name=fresh"])
    assert done.returncode == 128 + 15 and "during set-up" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_sigterm_in_setup_removes_only_the_files_it_added(tmp_path, tiny_run_args):
    run = tmp_path / "out" / "mine"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("the user's\n")
    done = sigterm_in_setup([*tiny_run_args(1), f"out_dir={tmp_path / 'out'}", "name=mine"])
    assert done.returncode == 128 + 15, done.stderr[-2000:]
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_sigterm_in_setup_of_a_resume_keeps_the_run(tmp_path, tiny_run_args):
    import train

    argv = [*tiny_run_args(1), f"out_dir={tmp_path / 'out'}", "name=kept"]
    assert train.main(argv) == 0
    run = tmp_path / "out" / "kept"
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    done = sigterm_in_setup([*argv, "train.max_steps=2"])
    assert done.returncode == 128 + 15, done.stderr[-2000:]
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert {".lock", "config.yaml", "tokenizer.json"} <= {str(p) for p in after}
    assert after[Path("tokenizer.json")] == before[Path("tokenizer.json")] and set(after) == set(before)
