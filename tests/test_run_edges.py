"""The edges of a run never mislead: damaged checkpoint bytes, a preemption during set-up, a full disk,
resuming from the run itself and the LR schedule's messages. Most tests copy one uninterrupted 4-step run
with a checkpoint at every step (as tests/test_resume_safety.py does) and resume the copy in-process.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import train
from trainer.checkpoint import CHECKPOINT_FMT
from trainer.metrics import read_rows

STEPS = 4
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _no_wandb():
    os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(scope="module")
def base(tiny_run_args) -> list[str]:
    return tiny_run_args(STEPS)


@pytest.fixture(scope="module")
def full(tmp_path_factory, base) -> Path:
    out = tmp_path_factory.mktemp("full")
    assert train.main([*base, f"out_dir={out}", "name=full"]) == 0
    return out / "full"


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_rows(run / "metrics.jsonl") if "loss" in r}


def lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_rows(run / "metrics.jsonl") if "lr" in r}


def snapshot(run: Path) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def interrupted_at(full: Path, dest: Path, step: int) -> Path:
    """A copy of `full` as a kill right after step `step`'s checkpoint leaves it."""
    run = dest / "full"
    shutil.copytree(full, run, symlinks=True)
    ckpts = run / "checkpoints"
    for s in range(step + 1, STEPS + 1):
        shutil.rmtree(ckpts / CHECKPOINT_FMT.format(s))
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to(CHECKPOINT_FMT.format(step))
    return run


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_5_damaged_checkpoint_bytes_are_refused_before_any_step(full, base, tmp_path, capsys):
    """4 KB overwritten inside a weight file (same size, valid header): refused naming the file, nothing written."""
    for name in ("accelerate/model.safetensors", "model.safetensors"):
        run = interrupted_at(full, tmp_path / name.replace("/", "_"), 2)
        target = run / "checkpoints" / CHECKPOINT_FMT.format(2) / name
        size = target.stat().st_size
        with open(target, "r+b") as f:
            f.seek(size // 2)
            f.write(b"\xff" * 4096)  # NaN-ish garbage in the tensor data, header untouched
        assert target.stat().st_size == size
        before = snapshot(run)
        capsys.readouterr()
        assert train.main([*base, f"out_dir={run.parent}", "name=full"]) == 2
        [line] = error_lines(capsys)
        assert name in line and "damaged" in line and CHECKPOINT_FMT.format(2) in line, line
        assert snapshot(run) == before


def run_script(script: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def test_6_sigterm_during_setup_requeues_under_slurm(base, tmp_path):
    """SIGTERM while the data is prepared and while the checkpoint loads (a fake scontrol on PATH records the
    call): the job is requeued, nothing half-written is left."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    cache = tmp_path / "cache"  # a cache of its own: the data is prepared in this process
    argv = [*[a for a in base if not a.startswith("data.cache_dir=")], f"data.cache_dir={cache}",
            f"out_dir={tmp_path / 'out'}", "name=preempted"]
    phases = {
        "data prep": ("data.prepare", "_build"),  # inside data prep's own temp-dir handler
        "checkpoint load": ("trainer.loop", "load_checkpoint"),
    }
    for phase, (module, function) in phases.items():
        done = run_script(f"""
            import os, signal, sys, time, importlib
            sys.argv = ["train.py"] + {argv!r}
            import train
            module = importlib.import_module({module!r})
            def preempted(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the handler leaves before this ends
            setattr(module, {function!r}, preempted)
            sys.exit(train.main(sys.argv[1:]))
            """, env, ROOT)
        assert done.returncode == 128 + 15, (phase, done.returncode, done.stderr[-2000:])
        assert "during set-up" in done.stderr and "requeued SLURM job 4242" in done.stderr, (phase, done.stderr[-2000:])
        assert calls.read_text().splitlines() == ["requeue 4242"], phase
        calls.unlink()
        if phase == "data prep":
            assert not [p for p in cache.iterdir() if ".tmp-" in p.name], list(cache.iterdir())  # partial data removed
            # Prepare for the next phase: a run with a checkpoint to load.
            assert train.main([*argv, "train.max_steps=1"]) == 0


def test_7_disk_full_is_one_line_naming_the_disk_and_the_last_good_checkpoint(base, tmp_path, monkeypatch, capsys):
    import torch

    import trainer.metrics

    # A checkpoint write fails the way torch.save fails on a full disk (the optimizer state), at step 3.
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "step_0000003" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "ckpt"
    assert train.main([*base, f"out_dir={out}", "name=full"]) == 1
    [line] = error_lines(capsys)
    ckpts = out / "full" / "checkpoints"
    assert "checkpoint of step 3" in line and "GiB free" in line and str(ckpts / CHECKPOINT_FMT.format(2)) in line, line
    assert "inline_container" in line  # the cause, in the same line
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest"] + [CHECKPOINT_FMT.format(s) for s in (1, 2)]
    assert (ckpts / "latest").resolve().name == CHECKPOINT_FMT.format(2)
    monkeypatch.undo()

    # A metrics append fails with ENOSPC after step 2's rows: the run stops at the end of that step.
    real_open = open
    written = []

    def failing_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            written.append(path)
            if len(written) > 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(trainer.metrics, "open", failing_open, raising=False)
    out = tmp_path / "metrics"
    assert train.main([*base, f"out_dir={out}", "name=full"]) == 1
    [line] = error_lines(capsys)
    assert "metrics.jsonl" in line and "No space left on device" in line and "GiB free" in line, line
    assert str(out / "full" / "checkpoints" / CHECKPOINT_FMT.format(2)) in line, line
    assert sorted(losses(out / "full")) == [1, 2]  # the file holds whole rows only


def test_8_resume_from_the_run_itself(full, base, tmp_path, capsys):
    """`train.py out_dir=... name=X` and `--resume out/X` continue with the run's config.yaml plus only the new
    overrides, and equal the uninterrupted run."""
    run = interrupted_at(full, tmp_path / "by_name", 2)
    assert train.main([f"out_dir={run.parent}", "name=full"]) == 0
    assert "continuing" in capsys.readouterr().out
    assert losses(run) == losses(full)

    run = interrupted_at(full, tmp_path / "by_path", 2)
    assert train.main(["--resume", str(run), "logging.log_interval=1"]) == 0
    assert losses(run) == losses(full)

    # A new override that the run cannot take is refused naming it, as before.
    run = interrupted_at(full, tmp_path / "changed", 2)
    assert train.main(["--resume", str(run), "model.n_layer=2"]) == 2
    [line] = error_lines(capsys)
    assert "model.n_layer: 1 -> 2" in line


def test_9_warmup_and_schedule_messages_match_the_lr(full, base, tmp_path, capsys):
    out = tmp_path / "warm"
    assert train.main([*base, f"out_dir={out}", "name=w", "train.warmup_steps=10", "train.ckpt_interval=100"]) == 0
    text = capsys.readouterr().out
    assert "train.warmup_steps=10" in text and "max_steps=4" in text
    peak = max(lrs(out / "w").values())
    assert f"{peak:.3g}" in text  # the warning names the highest lr the run reaches

    # Resuming with a longer max_steps: the message states the lr the extra steps get, and they get it.
    run = interrupted_at(full, tmp_path / "longer", STEPS)
    assert train.main([f"out_dir={run.parent}", "name=full", "train.max_steps=6"]) == 0
    text = capsys.readouterr().out
    after = lrs(run)
    assert after[5] == after[6] == pytest.approx(1e-4)  # min_lr past the horizon
    assert "1.00e-04" in text and "steps 5-6" in text, text

    constant = tmp_path / "constant"
    assert train.main([*base, f"out_dir={constant}", "name=c", "train.lr_schedule=constant", "train.max_steps=2"]) == 0
    capsys.readouterr()
    assert train.main([f"out_dir={constant}", "name=c", "train.max_steps=3"]) == 0
    text = capsys.readouterr().out
    assert lrs(constant / "c")[3] == pytest.approx(1e-3)
    assert "min_lr" not in text.split("resumed from")[1] and "step 3 run at lr 1.00e-03" in text, text
