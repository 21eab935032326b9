"""HF export: the folder loads in transformers as LlamaForCausalLM and computes the same logits."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from model.export_hf import unsupported
from model.load import load_run

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog and cat sat on mat while bird sings of night day sun moon".split()


def tiny_run(tmp_path: Path, name: str, *overrides: str) -> Path:
    os.environ["WANDB_MODE"] = "disabled"
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        rng = random.Random(0)
        for d in range(6):
            (corpus / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)) + "\n")
    # Grouped-query heads and a non-default RoPE base, so the config mapping is exercised.
    assert train.main([f"name={name}", f"out_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}",
                       f"data.source={corpus}", "data.vocab_size=300", "model.n_layer=2", "model.n_head=4",
                       "model.n_kv_head=2", "model.n_embd=32", "model.block_size=32", "model.rope_theta=500",
                       "train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=3", "train.lr=1e-2",
                       "train.warmup_steps=1", "train.eval_batches=1", "logging.progress=false", *overrides]) == 0
    return tmp_path / "out" / name


def test_export_matches_sinklab_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tiny_run(tmp_path, "soft")
    out = tmp_path / "hf"
    res = subprocess.run([sys.executable, "-m", "model.export_hf", "--ckpt", str(run_dir), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    run = load_run(run_dir)
    text = "the lazy dog sat on the mat while the bird sings of the sun and moon"
    ids = run.tokenizer.encode(text).ids
    assert tok(text, add_special_tokens=False)["input_ids"] == ids and tok.decode(ids) == text
    idx = torch.tensor([(ids + ids)[:32]])  # the full context
    with torch.no_grad():
        ours = run.model(idx).logits
        theirs = hf(idx).logits.float()
    assert ours.std() > 0.1  # a trained, non-degenerate model
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=0), (theirs - ours).abs().max()


def test_export_refuses_what_llama_cannot_compute(tmp_path):
    run_dir = tiny_run(tmp_path, "sig", "model.attention=sigmoid")
    out = tmp_path / "hf"
    res = subprocess.run([sys.executable, "-m", "model.export_hf", "--ckpt", str(run_dir), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "attention='sigmoid'" in res.stderr and "Llama computes softmax attention" in res.stderr
    assert not out.exists()
    assert unsupported({"attention": "softmax", "gate": "elementwise"}) == [
        "gate='elementwise' (Llama has no attention output gate)"]
    assert unsupported({"attention": "softmax", "gate": "none", "qk_norm": True}) == [
        "qk_norm=true (Llama has no q/k RMSNorm)"]
    assert unsupported({"attention": "softmax", "gate": "none", "qk_norm": False}) == []


@pytest.mark.parametrize("kind", ["elu1", "linear"])
def test_unsupported_names_the_attention(kind):
    assert f"attention={kind!r}" in unsupported({"attention": kind})[0]
