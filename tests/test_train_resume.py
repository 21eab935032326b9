"""Resume is exact: N steps + resume from the step-N checkpoint == an uninterrupted 2N-step run.

Both runs share the config (so the same lr schedule); the resumed one starts from the
uninterrupted run's step-N checkpoint under a new name, restoring weights, AdamW moments and
RNG through Accelerate, while the loader redraws batches from (seed, step). Losses and final
weights must agree bit for bit in one process.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

import train

WORDS = "the quick brown fox jumps over a lazy dog and cat sat on mat while bird sings of night day sun moon".split()
N = 3


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    os.environ["WANDB_MODE"] = "disabled"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for d in range(6):
        (corpus / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)) + "\n")
    base = [f"out_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}", f"data.source={corpus}",
            "data.vocab_size=300", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
            "train.batch_size=4", "train.micro_batch_size=2", f"train.max_steps={2 * N}", "train.warmup_steps=2",
            f"train.ckpt_interval={N}", "train.eval_interval=100", "train.eval_windows=2", "logging.progress=false"]
    assert train.main([*base, "name=full"]) == 0
    full = tmp_path / "out" / "full"
    ckpt = full / "checkpoints" / f"step_{N:07d}"
    assert train.main([*base, "name=resumed", f"train.resume={ckpt}"]) == 0
    resumed = tmp_path / "out" / "resumed"

    expected = {s: v for s, v in losses(full).items() if s > N}
    assert len(expected) == N and losses(resumed) == expected  # exact, not approximately
    assert len(set(expected.values())) == N  # the steps really differ (a frozen model would also "match")
    a = load_file(resumed / "checkpoints" / "latest" / "model.safetensors")
    b = load_file(full / "checkpoints" / "latest" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((resumed / "checkpoints" / "latest" / "trainer_state.json").read_text())
    assert state["step"] == 2 * N and state["tokens"] == 2 * N * 4 * 32
