"""A run never loses work: kills during a checkpoint write, SIGTERM, non-finite steps, bad resumes.

Each run is a real `python train.py` process (signals and exit codes are the point). Faults that
cannot be caused from outside at the right instant are injected by a small wrapper that patches
one function and then runs train.main: the process really dies by SIGKILL in the middle of
writing model.safetensors, or its model really returns a NaN loss on one step.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs import ConfigError
from trainer.checkpoint import check_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Dies by SIGKILL half-way through writing the weights of the second checkpoint.
KILL_IN_SECOND_SAVE = """
import os, signal, sys
import model.weights as L, train
real, calls = L.save_weights, []
def dying(state_dict, path, tied):
    calls.append(path)
    real(state_dict, path, tied)
    if len(calls) == 2:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
L.save_weights = dying
sys.exit(train.main(sys.argv[1:]))
"""

# The model returns a NaN loss in the forward passes of optimizer step 2 (micro-batches 3 and 4).
NAN_AT_STEP_2 = """
import os, sys, torch
import model.gpt as G, train
real, calls = G.GPT.forward, [0]
def forward(self, idx, targets=None, **kw):
    out = real(self, idx, targets, **kw)
    if targets is not None and self.training:
        calls[0] += 1
        if calls[0] in (3, 4):
            out.loss = out.loss * float("nan")
    return out
G.GPT.forward = forward
# The weights after every optimizer step, to $WEIGHTS_DIR/after_<step>.pt (no checkpoint is written in a bad streak).
real_step = train.Trainer.train_step
def train_step(self, step):
    out = real_step(self, step)
    torch.save(self.acc.unwrap_model(self.model).state_dict(), f"{os.environ['WEIGHTS_DIR']}/after_{step + 1}.pt")
    return out
train.Trainer.train_step = train_step
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def base(word_corpus) -> list[str]:
    root, corpus = word_corpus, word_corpus / "corpus"
    return [f"data.cache_dir={root / 'cache'}", f"data.source={corpus}", "data.vocab_size=300",
            "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
            "train.batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1",
            "train.eval_windows=4", "logging.progress=false"]


def run_train(args: list[str], script: str | None = None, **popen) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "train.py", *args]
    popen.setdefault("env", {**os.environ, "WANDB_MODE": "disabled"})
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **popen)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run) if "loss" in r}


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path, base):
    args = [*base, "name=k", f"out_dir={tmp_path}", "train.max_steps=6", "train.ckpt_interval=2",
            "train.eval_interval=100"]
    run = tmp_path / "k"
    killed = run_train(args, KILL_IN_SECOND_SAVE)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpts = run / "checkpoints"
    assert os.readlink(ckpts / "latest") == "step_0000002"  # still the last complete one
    check_checkpoint((ckpts / "latest").resolve())  # and it is intact
    assert not (ckpts / "step_0000004").exists() and (ckpts / ".tmp_step_0000004").is_dir()
    before = losses(run)
    assert sorted(before) == [1, 2, 3, 4]  # steps 3-4 ran, their checkpoint did not survive

    resumed = run_train([*args, "train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_0000002" in resumed.stdout
    after = losses(run)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert all(after[s] == before[s] for s in before)  # steps 3-4 redone exactly
    assert os.readlink(ckpts / "latest") == "step_0000006"
    assert not (ckpts / ".tmp_step_0000004").exists()
    assert load_file(ckpts / "step_0000004" / "model.safetensors")  # rewritten whole


def test_sigterm_mid_run_saves_and_exits_cleanly(tmp_path, base):
    args = [*base, "name=t", f"out_dir={tmp_path}", "train.max_steps=100000", "train.ckpt_interval=100000",
            "train.eval_interval=100000"]
    metrics = tmp_path / "t" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "received SIGTERM" in out and "train.resume=auto" in out and "Traceback" not in err
    last = max(losses(tmp_path / "t"))
    ckpt = (tmp_path / "t" / "checkpoints" / "latest").resolve()
    assert ckpt.name == f"step_{last:07d}"
    check_checkpoint(ckpt)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == last


def test_a_nan_step_is_skipped_counted_and_leaves_the_weights(tmp_path, base):
    args = [*base, "name=n", f"out_dir={tmp_path}", "train.max_steps=3", "train.ckpt_interval=1",
            "train.eval_interval=100"]
    out = run_train(args, NAN_AT_STEP_2, env={**os.environ, "WANDB_MODE": "disabled", "WEIGHTS_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    r = {row["step"]: row for row in rows(tmp_path / "n") if "loss" in row}
    assert r[1]["skipped_steps"] == 0 and r[2]["skipped_steps"] == 1 and r[3]["skipped_steps"] == 1
    assert r[2]["loss"] is None  # a non-finite loss is logged as null (metrics.jsonl stays valid JSON)
    assert r[3]["loss"] == r[3]["loss"]  # training went on
    w1, w2, w3 = (torch.load(tmp_path / f"after_{s}.pt") for s in (1, 2, 3))
    assert all((w1[k] == w2[k]).all() for k in w1)  # the skipped step changed nothing
    assert any((w2[k] != w3[k]).any() for k in w2)  # the next one did
    ckpts = tmp_path / "n" / "checkpoints"  # and no checkpoint was written in the non-finite step
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000001", "step_0000003"]
    assert all(torch.equal(load_file(ckpts / "step_0000003" / "model.safetensors")[k], v) for k, v in w3.items()
               if not k.startswith("lm_head"))


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path, base):
    # lr=1e30 blows the weights up after one update: every later gradient overflows.
    args = [*base, "name=b", f"out_dir={tmp_path}", "train.max_steps=50", "train.ckpt_interval=100",
            "train.eval_interval=100", "train.lr=1e30", "train.min_lr=0", "train.max_bad_steps=3"]
    out = run_train(args)
    assert out.returncode == 1
    assert "not finite for 3 steps in a row" in out.stdout and "Traceback" not in out.stderr
    r = [row for row in rows(tmp_path / "b") if "loss" in row]
    assert [row["skipped_steps"] for row in r] == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base) -> Path:
    """A finished 2-step run to resume from."""
    out = tmp_path_factory.mktemp("finished")
    res = run_train([*base, "name=r", f"out_dir={out}", "train.max_steps=2", "train.ckpt_interval=2",
                     "train.eval_interval=100"])
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "r"


def snapshot(run: Path) -> dict:
    """Every file's bytes; .lock only holds the pid of whoever last trained the run."""
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def refuse_resume(tmp_path: Path, finished: Path, base: list[str], damage, *overrides: str) -> str:
    run = tmp_path / "r"
    shutil.copytree(finished, run, symlinks=True)
    damage((run / "checkpoints" / "latest").resolve())
    before = snapshot(run)
    out = run_train([*base, "name=r", f"out_dir={tmp_path}", "train.max_steps=4", *overrides])
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert snapshot(run) == before  # nothing overwritten
    return out.stderr


def test_resume_with_a_different_model_shape_refuses(tmp_path, base, finished):
    err = refuse_resume(tmp_path, finished, base, lambda ckpt: None, "model.n_embd=64")
    assert "model.n_embd: 32 -> 64" in err and "name=<new name>" in err


def test_resume_from_a_truncated_checkpoint_refuses(tmp_path, base, finished):
    def truncate(ckpt):
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    err = refuse_resume(tmp_path, finished, base, truncate)
    assert "model.safetensors is missing or damaged" in err and "train.resume=" in err


def test_resume_without_trainer_state_refuses(tmp_path, base, finished):
    err = refuse_resume(tmp_path, finished, base, lambda ckpt: (ckpt / "trainer_state.json").unlink())
    assert "trainer_state.json is missing or unreadable" in err


def test_check_checkpoint_accepts_a_good_one(finished):
    check_checkpoint((finished / "checkpoints" / "latest").resolve())
    with pytest.raises(ConfigError, match="no such directory"):
        check_checkpoint(finished / "checkpoints" / "step_9999999")
