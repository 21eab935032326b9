"""Runs never lose work or drift silently: what is on disk after a kill, a sync or a user's edit is
resumed from exactly, or refused before anything is written.

Most tests copy (parts of) one uninterrupted 6-step run with a checkpoint at every step, damage or
change the copy the way a tool or a user would, resume it in-process, and compare the losses with
the uninterrupted run's bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import train
from configs import load_config
from trainer.checkpoint import TrainerState, clean_leftovers, prune, save_checkpoint, write_manifest
from trainer.metrics import read_rows
from trainer.optim import lr_at
from trainer.rundir import CHECKPOINT_FMT, RunLock, newest_checkpoint
from trainer.signals import requeue_if_slurm

STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def _no_wandb():
    os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(scope="module")
def base(tiny_run_args) -> list[str]:
    return tiny_run_args(STEPS)


@pytest.fixture(scope="module")
def full(tmp_path_factory, base) -> Path:
    """The uninterrupted run: a checkpoint at every step."""
    out = tmp_path_factory.mktemp("full")
    assert train.main([*base, f"out_dir={out}", "name=full"]) == 0
    return out / "full"


def ckpt_name(step: int) -> str:
    return CHECKPOINT_FMT.format(step)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_rows(run / "metrics.jsonl") if "loss" in r}


def snapshot(run: Path) -> dict:
    """Every file's bytes; .lock only holds the pid of whoever last trained the run."""
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def interrupted_at(full: Path, dest: Path, step: int) -> Path:
    """A copy of `full` as a kill after step `step`'s checkpoint leaves it (metrics rows may run ahead)."""
    run = dest / "full"
    shutil.copytree(full, run, symlinks=True)
    ckpts = run / "checkpoints"
    for s in range(step + 1, STEPS + 1):
        shutil.rmtree(ckpts / ckpt_name(s))
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to(ckpt_name(step))
    return run


def resume(base: list[str], run: Path, *overrides: str) -> int:
    return train.main([*base, f"out_dir={run.parent}", f"name={run.name}", *overrides])


# 1 ------------------------------------------------------------------------------------------
def test_missing_latest_resumes_from_the_newest_step_dir(tmp_path, base, full, capsys):
    run = interrupted_at(full, tmp_path, 4)
    (run / "checkpoints" / "latest").unlink()  # rm, rsync without -l, a filesystem without symlinks
    kept = {k: v for k, v in snapshot(run).items() if k.parts[0] == "checkpoints"}
    assert resume(base, run) == 0
    assert f"resumed from {run / 'checkpoints' / ckpt_name(4)} at step 4" in capsys.readouterr().out
    assert losses(run) == losses(full)  # rows 1-4 kept, 5-6 redone exactly
    after = snapshot(run)
    assert all(after[k] == v for k, v in kept.items())  # step_1..4 untouched
    assert os.readlink(run / "checkpoints" / "latest") == ckpt_name(6)
    # another run's checkpoint would be saved over this run's step dirs: refused
    before = snapshot(run)
    assert resume(base, run, f"train.resume={full / 'checkpoints' / ckpt_name(2)}") == 2
    assert "already holds checkpoints of its own" in capsys.readouterr().err
    assert snapshot(run) == before


# 2 ------------------------------------------------------------------------------------------
def test_latest_as_a_copied_dir_resumes_and_is_replaced_by_a_link(tmp_path, base, full, capsys):
    run = interrupted_at(full, tmp_path, 4)
    latest = run / "checkpoints" / "latest"
    latest.unlink()
    shutil.copytree(run / "checkpoints" / ckpt_name(3), latest)  # cp -rL of an older state, then more steps
    assert resume(base, run) == 0
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / ckpt_name(4)}" in out and "copied dir" in out
    assert losses(run) == losses(full)
    assert latest.is_symlink() and os.readlink(latest) == ckpt_name(6)
    assert not (run / "checkpoints" / ".latest.old").exists()


# 3 ------------------------------------------------------------------------------------------
def test_resume_on_changed_data_is_refused_before_anything_is_written(tmp_path, base, word_corpus, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(word_corpus / "corpus", corpus)
    args = [a for a in base if not a.startswith(("data.source=", "train.max_steps="))]
    args += [f"data.source={corpus}", "train.max_steps=2", f"out_dir={tmp_path / 'out'}", "name=fp"]
    assert train.main(args) == 0
    run = tmp_path / "out" / "fp"
    saved = json.loads((run / "checkpoints" / "latest" / "trainer_state.json").read_text())["data_fingerprint"]
    assert saved["train_tokens"] > 0
    (corpus / "doc_new.txt").write_text("the cat sat on the mat while the bird sings\n")
    before = snapshot(run)
    capsys.readouterr()
    assert train.main([*args, "train.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "not the data this run was trained on" in err and "cannot resume from" in err
    assert snapshot(run) == before

    # a checkpoint from before fingerprints were stored still resumes
    (corpus / "doc_new.txt").unlink()
    for ckpt in (run / "checkpoints").glob("step_*"):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        del state["data_fingerprint"]
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        write_manifest(ckpt)
    assert train.main([*args, "train.max_steps=2"]) == 0


# 5 ------------------------------------------------------------------------------------------
def test_resume_with_another_micro_batch_at_an_odd_step_matches(tmp_path, base):
    """A checkpoint saved with 2 micro-batches per step, resumed with 4 at step 3: Accelerate's restored
    micro-step counter (6) is mid-window for 4 (6 % 4 = 2); the loop must realign it."""
    one = [*base, "train.micro_batch_size=1", f"out_dir={tmp_path}"]
    assert train.main([*one, "name=mb1"]) == 0
    run = interrupted_at(tmp_path / "mb1", tmp_path / "copy", 3)
    rng_file = run / "checkpoints" / ckpt_name(3) / "accelerate" / "random_states_0.pkl"
    states = torch.load(rng_file, weights_only=False)
    assert states["step"] == 3 * 4
    states["step"] = 3 * 2  # what the same step saved under micro_batch_size=2 holds
    torch.save(states, rng_file)
    write_manifest(run / "checkpoints" / ckpt_name(3))
    assert train.main([*one, f"out_dir={run.parent}", "name=full"]) == 0
    assert losses(run) == losses(tmp_path / "mb1")


# 6 ------------------------------------------------------------------------------------------
def test_resume_from_an_older_step_abandons_the_newer_branch_at_once(tmp_path, base, full):
    run = tmp_path / "full"
    shutil.copytree(full, run, symlinks=True)
    ckpts = run / "checkpoints"
    cfg = load_config(None, [*base, f"out_dir={tmp_path}", "name=full", f"train.resume={ckpts / ckpt_name(2)}"])
    trainer = train.Trainer(cfg)  # starts from step 2 ...
    trainer.release_lock()  # ... and is killed before its first checkpoint
    assert os.readlink(ckpts / "latest") == ckpt_name(2)
    assert sorted(p.name for p in (ckpts / "abandoned").iterdir()) == [ckpt_name(s) for s in range(3, STEPS + 1)]
    assert [r["step"] for r in read_rows(run / "metrics.jsonl")] == [1, 2]
    assert resume(base, run) == 0  # train.resume=auto continues the new branch
    assert [r["step"] for r in read_rows(run / "metrics.jsonl") if "loss" in r] == list(range(1, STEPS + 1))
    assert losses(run) == losses(full)


# 9 ------------------------------------------------------------------------------------------
def test_no_checkpoints_in_a_non_finite_streak(tmp_path, base, capsys):
    # lr=1e30: step 1 is finite and blows the weights up, every later step overflows.
    args = [*base, f"out_dir={tmp_path}", "name=b", "train.lr=1e30", "train.min_lr=0", "train.max_bad_steps=3"]
    assert train.main(args) == 1
    ckpts = tmp_path / "b" / "checkpoints"
    assert [p.name for p in sorted(ckpts.glob("step_*"))] == [ckpt_name(1)]
    assert f"the last good checkpoint is {ckpts / ckpt_name(1)}" in capsys.readouterr().out
    # A resume starts outside a streak (the checkpoint ended on a finite step); the total carries over.
    assert train.main(args) == 1
    rows = [r for r in read_rows(tmp_path / "b" / "metrics.jsonl") if "loss" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2, 3]
    assert "not finite for 3 steps in a row (step 4)" in capsys.readouterr().out


# 11 -----------------------------------------------------------------------------------------
def test_raising_max_steps_keeps_the_lr_schedule(tmp_path, base, full, capsys):
    run = tmp_path / "full"
    shutil.copytree(full, run, symlinks=True)
    assert resume(base, run, "train.max_steps=8") == 0
    assert "keeps that horizon" in capsys.readouterr().out
    rows = {r["step"]: r for r in read_rows(run / "metrics.jsonl") if "loss" in r}
    cfg = load_config(None, base).train
    assert rows[7]["lr"] == rows[8]["lr"] == cfg.min_lr  # past the 6-step horizon: min_lr, no jump back up
    assert rows[6]["lr"] == lr_at(5, cfg)  # and what the run already did is unchanged
    state = json.loads((run / "checkpoints" / "latest" / "trainer_state.json").read_text())
    assert state["lr_horizon"] == STEPS


# 13 -----------------------------------------------------------------------------------------
def test_a_second_process_on_the_same_run_exits_2_naming_the_holder(tmp_path, base, full, capsys):
    run = tmp_path / "full"
    shutil.copytree(full, run, symlinks=True)
    holder = RunLock(run)
    try:
        before = snapshot(run)
        assert resume(base, run, "train.max_steps=8") == 2
        assert f"in use by another training process (pid {os.getpid()})" in capsys.readouterr().err
        assert snapshot(run) == before
    finally:
        holder.release()


# 14 -----------------------------------------------------------------------------------------
def test_a_torn_last_metrics_line_is_dropped(tmp_path, base, full):
    from eval.spikes import read_metrics

    run = interrupted_at(full, tmp_path, 4)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "tokens": 89')  # killed mid-row
    with pytest.warns(UserWarning, match="torn last line"):
        steps, _ = read_metrics(run / "metrics.jsonl", "loss")
    assert steps == list(range(1, STEPS + 1))
    with pytest.warns(UserWarning, match="torn last line"):
        assert resume(base, run) == 0
    assert losses(run) == losses(full)
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        read_rows(run / "metrics.jsonl")


# 15 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["accelerate/optimizer.bin", "accelerate/model.safetensors"])
@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "older-checkpoint"])
def test_truncated_accelerate_state_is_refused_before_anything_is_written(tmp_path, base, full, capsys, name,
                                                                          manifest):
    run = interrupted_at(full, tmp_path, 4)
    ckpt = run / "checkpoints" / ckpt_name(4)
    if not manifest:
        (ckpt / "manifest.json").unlink()
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2])
    before = snapshot(run)
    assert resume(base, run) == 2
    err = capsys.readouterr().err
    assert f"{name} is " in err and "damaged" in err and "Nothing was overwritten" in err
    assert snapshot(run) == before


# 16 -----------------------------------------------------------------------------------------
def test_a_kill_while_re_saving_a_step_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(torch.nn.Linear(3, 2), torch.optim.AdamW(torch.nn.Linear(3, 2).parameters()))
    save_checkpoint(acc, model, tmp_path, TrainerState(step=5), tied=False)
    ckpts = tmp_path / "checkpoints"
    first = snapshot(ckpts / ckpt_name(5))

    real = os.replace

    class Killed(Exception):
        pass

    def dies_after_moving_the_old_dir_aside(src, dst):
        real(src, dst)
        if Path(dst).name.startswith(".old_"):
            raise Killed

    monkeypatch.setattr(os, "replace", dies_after_moving_the_old_dir_aside)
    with pytest.raises(Killed):
        save_checkpoint(acc, model, tmp_path, TrainerState(step=5), tied=False)
    monkeypatch.undo()
    assert [p.name for p in clean_leftovers(ckpts)] and newest_checkpoint(ckpts) == ckpts / ckpt_name(5)
    assert snapshot(ckpts / ckpt_name(5)) == first  # the old copy came back whole
    save_checkpoint(acc, model, tmp_path, TrainerState(step=5), tied=False)  # an uninterrupted re-save
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", ckpt_name(5)]


# 18 -----------------------------------------------------------------------------------------
def test_leftover_temp_dirs_are_cleaned_at_start(tmp_path, base, full, capsys):
    run = interrupted_at(full, tmp_path, 5)
    for leftover in (".tmp_step_0000006", ".tmp_step_0000009"):  # a kill, a full disk
        (run / "checkpoints" / leftover / "accelerate").mkdir(parents=True)
        (run / "checkpoints" / leftover / "accelerate" / "optimizer.bin").write_bytes(b"\0" * 1000)
    assert resume(base, run) == 0
    assert "removed .tmp_step_0000009" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", *(ckpt_name(s) for s in range(1, 7))]


# operations -------------------------------------------------------------------------------
def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, base, monkeypatch):
    from accelerate import Accelerator

    calls = []
    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, project, config=None, init_kwargs=None:
                        calls.append(init_kwargs["wandb"]))
    args = [*base, f"out_dir={tmp_path}", "name=w", "logging.wandb=true"]
    assert train.main([*args, "train.max_steps=1"]) == 0
    assert train.main([*args, "train.max_steps=2"]) == 0
    run_id = (tmp_path / "w" / "wandb_run_id").read_text().strip()
    assert calls == [{"name": "w", "id": run_id, "resume": "allow", "dir": str(tmp_path / "w")}] * 2


def test_keep_last_prunes_old_checkpoints_but_never_latest(tmp_path, base):
    assert train.main([*base, f"out_dir={tmp_path}", "name=k", "train.max_steps=4", "train.keep_last=2"]) == 0
    ckpts = tmp_path / "k" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [ckpt_name(3), ckpt_name(4)]
    assert os.readlink(ckpts / "latest") == ckpt_name(4)
    # latest repointed at an older step by hand: pruning keeps it
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to(ckpt_name(3))
    (ckpts / ckpt_name(5)).mkdir()
    prune(ckpts, keep_last=1)
    assert sorted(p.name for p in ckpts.glob("step_*")) == [ckpt_name(3), ckpt_name(5)]


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch) -> Path:
    """An `scontrol` on PATH that records its arguments (and fails for job 'bad')."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$2" != bad ] || {{ echo "no such job" >&2; exit 1; }}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_sigterm_under_slurm_requeues_the_job(fake_scontrol, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_if_slurm("SIGTERM") is None  # not under SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_if_slurm("SIGINT") is None  # Ctrl-C / scancel --signal=INT: stop for good
    assert not fake_scontrol.exists()
    assert requeue_if_slurm("SIGTERM") == "requeued SLURM job 4242"
    assert fake_scontrol.read_text() == "requeue 4242\n"
    monkeypatch.setenv("SLURM_JOB_ID", "bad")
    assert "could not requeue SLURM job bad (scontrol: no such job)" in requeue_if_slurm("SIGTERM")



def test_evals_and_sampling_find_the_newest_checkpoint_without_latest(tmp_path):
    """runs.load.resolve_checkpoint (sample.py and every eval) reads what is on disk, like resume."""
    from runs.load import resolve_checkpoint

    ckpts = tmp_path / "run" / "checkpoints"
    for step in (2, 10, 4):
        (ckpts / CHECKPOINT_FMT.format(step)).mkdir(parents=True)
        (ckpts / CHECKPOINT_FMT.format(step) / "model.safetensors").write_bytes(b"")
    newest = (ckpts / CHECKPOINT_FMT.format(10)).resolve()
    assert resolve_checkpoint(tmp_path / "run") == newest  # no latest at all
    (ckpts / "latest").symlink_to(CHECKPOINT_FMT.format(4))
    assert resolve_checkpoint(tmp_path / "run") == (ckpts / CHECKPOINT_FMT.format(4)).resolve()  # latest wins
    (ckpts / "latest").unlink()
    (ckpts / "latest").symlink_to("step_9999999")  # dangling
    assert resolve_checkpoint(tmp_path / "run") == newest
    assert resolve_checkpoint(ckpts / CHECKPOINT_FMT.format(2)) == (ckpts / CHECKPOINT_FMT.format(2)).resolve()
