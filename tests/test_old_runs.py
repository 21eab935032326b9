"""A run dir written by an older layout of the code still loads, evaluates and resumes.

tests/fixtures/old_run was written by the code before fixes/, model/interop/, model/block.py,
trainer/loop.py and util.py existed (commit f10d804): `python train.py` with the overrides in
OLD_ARGS, run in a folder holding the word corpus below (data.source and data.cache_dir are relative
paths in its config.yaml). Two steps, a checkpoint at each, keep_last=1.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import train
from eval import sink
from model import GPT, GPTConfig
from runs.load import load_run

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old_run"
OLD_ARGS = ["data.cache_dir=cache", "data.source=corpus", "data.vocab_size=300", "model.n_layer=1", "model.n_head=2",
            "model.n_embd=32", "model.block_size=32", "train.batch_size=4", "train.micro_batch_size=2",
            "train.warmup_steps=1", "train.ckpt_interval=1", "train.eval_interval=100", "train.eval_windows=2",
            "logging.progress=false", "out_dir=out", "train.keep_last=1"]


@pytest.fixture
def old_run(tmp_path, monkeypatch, single_thread) -> Path:
    """The fixture copied into a fresh folder with the corpus it trained on (the word corpus of conftest)."""
    monkeypatch.chdir(tmp_path)
    words = "the quick brown fox jumps over a lazy dog and cat sat on mat while bird sings of night day sun moon"
    rng = random.Random(0)
    (tmp_path / "corpus").mkdir()
    for d in range(6):
        (tmp_path / "corpus" / f"doc{d}.txt").write_text(" ".join(rng.choice(words.split()) for _ in range(600)) + "\n")
    run = tmp_path / "out" / "old_run"
    shutil.copytree(FIXTURE, run, symlinks=True)
    return run


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_an_old_run_loads_with_its_weights(old_run):
    run = load_run(old_run, "cpu")
    assert run.checkpoint == (old_run / "checkpoints" / "step_0000002").resolve()
    # The same function as a GPT built by hand from the checkpoint's config and weights.
    saved = yaml.safe_load((run.checkpoint / "config.yaml").read_text())["model"]
    ref = GPT(GPTConfig(**saved)).eval()
    missing, unexpected = ref.load_state_dict(load_file(run.checkpoint / "model.safetensors"), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # the tied head is stored once
    idx = torch.randint(0, saved["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(run.model.eval()(idx).logits, ref(idx).logits, rtol=0, atol=0)


def test_an_old_run_evaluates(old_run, capsys):
    result, = sink.main(["--ckpt", str(old_run), "--lengths", "16", "--n-seqs", "4"])
    assert result.checkpoint["step"] == 2 and result.n_seqs == 4 and result.lengths == [16]
    assert 0 <= result.sink_1 <= 100 and 0 < result.f_attn <= 1
    saved = json.loads((old_run / "eval" / "sink.json").read_text())
    assert saved["sink_1"] == result.sink_1


def test_an_old_run_resumes_as_if_never_stopped(old_run, tmp_path):
    """Resuming the old run to step 3 gives the step-3 loss of an uninterrupted 3-step run of today's code."""
    assert train.main(["--resume", str(old_run), "train.max_steps=3"]) == 0
    resumed = losses(old_run)
    assert sorted(resumed) == [1, 2, 3]
    assert train.main([*OLD_ARGS, "name=fresh", "train.max_steps=3"]) == 0
    fresh = losses(tmp_path / "out" / "fresh")
    assert fresh[1] == pytest.approx(resumed[1], rel=1e-5) and fresh[2] == pytest.approx(resumed[2], rel=1e-5)
    assert fresh[3] == pytest.approx(resumed[3], rel=1e-5)


def test_an_old_config_is_upgraded_in_one_place():
    """configs.upgrade_saved: a config.yaml from before `task` existed is a language model's; the keys a run
    records beside its config (attention_backend) stay for the readers and are skipped when the config is
    built; what it has stays as it was."""
    from configs import from_dict, upgrade_saved

    saved = yaml.safe_load((FIXTURE / "config.yaml").read_text())
    assert saved["attention_backend"].startswith("sdpa")
    old = {k: v for k, v in saved.items() if k != "task"}
    new = upgrade_saved(old)
    assert new["task"] == "lm" and new["attention_backend"] == old["attention_backend"]
    assert {k: v for k, v in new.items() if k != "task"} == old
    assert from_dict(old).model.n_embd == 32 and from_dict(new).model.n_embd == 32
