"""train.init_from=hf:<folder>: training continues from an imported transformers model and its tokenizer.

A tiny Llama is built and saved by the test (tests/hf_models.py), so nothing touches the network.
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
import yaml

import train
from tests.hf_models import save_tiny

WORDS = "the quick brown fox jumps over a lazy dog and cat sat on mat while bird sings of night day sun moon".split()
BLOCK = 16  # below the import's context of 64: a run may train on shorter windows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for d in range(6):
        (root / "corpus" / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(300)) + "\n")
    return root, save_tiny("llama", root / "llama")


def train_run(root, folder, name, steps, extra=()):
    os.environ["WANDB_MODE"] = "disabled"
    argv = [f"train.init_from=hf:{folder}", f"data.source={root}/corpus", f"data.cache_dir={root}/cache",
            f"out_dir={root}/out", f"name={name}", f"model.block_size={BLOCK}", "train.batch_size=2",
            "train.micro_batch_size=2", f"train.max_steps={steps}", "train.warmup_steps=1", "train.lr=1e-3",
            "train.eval_windows=2", "train.ckpt_interval=2", "train.sink_interval=0", "logging.progress=false", *extra]
    assert train.main(argv) == 0
    rows = [json.loads(line) for line in (root / "out" / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_step_zero_loss_is_the_imported_models_loss(setup):
    from transformers import AutoModelForCausalLM

    from data.loader import BatchLoader

    root, folder = setup
    losses = train_run(root, folder, "fresh", 1)
    run_dir = root / "out" / "fresh"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["init_from"] == f"hf:{folder}"
    assert saved["data"]["tokenizer"] == str(folder) and saved["model"]["block_size"] == BLOCK
    assert (saved["model"]["n_layer"], saved["model"]["n_embd"], saved["model"]["n_kv_head"]) == (2, 32, 2)
    data_dir = next(p for p in (root / "cache").iterdir() if (p / "meta.json").is_file())
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["eot_id"] == 1  # documents end with the import's EOS </s>
    x, y = BatchLoader(data_dir, "train", 2, BLOCK, 1337).get_batch(0, 0)  # the run's first batch (seed 1337)
    hf = AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        logits = hf(x).logits
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    assert losses[1] == pytest.approx(reference, rel=1e-5)


def test_an_init_from_run_resumes_like_an_uninterrupted_one(setup, capsys):
    root, folder = setup
    whole = train_run(root, folder, "whole", 4)
    capsys.readouterr()
    # Resumed from the uninterrupted run's step 2 (same max_steps, so the same LR schedule).
    parts = train_run(root, folder, "parts", 4, (f"train.resume={root}/out/whole/checkpoints/step_0000002",))
    assert "resumed from" in capsys.readouterr().out
    assert sorted(parts) == [3, 4]
    assert [parts[s] for s in (3, 4)] == pytest.approx([whole[s] for s in (3, 4)], rel=1e-6)
