"""HF export: the folder loads in transformers as the architecture that computes the variant
(Llama, Qwen2, Qwen3, Qwen3-Next) with the same logits, and imports back through hf:."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from runs.export_hf import unsupported
from runs.load import load_run

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
                       "train.warmup_steps=1", "train.eval_windows=4", "logging.progress=false", *overrides]) == 0
    return tmp_path / "out" / name


def test_export_matches_sinklab_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tiny_run(tmp_path, "soft")
    out = tmp_path / "hf"
    res = subprocess.run([sys.executable, "-m", "runs.export_hf", "--ckpt", str(run_dir), "--out", str(out)],
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
    res = subprocess.run([sys.executable, "-m", "runs.export_hf", "--ckpt", str(run_dir), "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "attention='sigmoid'" in res.stderr and "transformers' decoders compute softmax attention" in res.stderr
    assert not out.exists()
    assert unsupported({"attention": "softmax", "gate": "elementwise"}) == [
        "gate='elementwise' without qk_norm (Qwen3-Next, the gated architecture, always normalises q and k)"]
    assert unsupported({"attention": "softmax", "gate": "none", "qk_norm": True, "attention_bias": True}) == [
        "attention_bias with qk_norm or a gate (Qwen3 and Qwen3-Next would bias o_proj as well)"]
    assert unsupported({"attention": "softmax", "gate": "none", "qk_norm": False}) == []
    assert unsupported({"attention": "softmax", "gate": "headwise", "qk_norm": True}) == []


@pytest.mark.parametrize("kind", ["elu1", "linear"])
def test_unsupported_names_the_attention(kind):
    assert f"attention={kind!r}" in unsupported({"attention": kind})[0]


ROUND_TRIPS = {  # variant -> (GPTConfig fields, the transformers class it exports to)
    "plain": ({"tie_embeddings": True}, "LlamaForCausalLM"),
    "rope_scaled": ({"tie_embeddings": False, "rope_scaling": "linear", "rope_scaling_factor": 4.0},
                    "LlamaForCausalLM"),
    "bias": ({"attention_bias": True}, "Qwen2ForCausalLM"),
    "qk_norm": ({"qk_norm": True, "head_size": 16}, "Qwen3ForCausalLM"),
    "gated": ({"qk_norm": True, "gate": "elementwise"}, "Qwen3NextForCausalLM"),
    "headwise": ({"qk_norm": True, "gate": "headwise", "rope_scaling": "llama3", "rope_scaling_factor": 8.0,
                  "rope_original_context": 8}, "Qwen3NextForCausalLM"),
}


@pytest.mark.parametrize("variant", list(ROUND_TRIPS))
def test_export_then_import_round_trip(tmp_path, variant):
    """A random sinklab model -> transformers folder: transformers and sinklab's hf: import both
    give the original logits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM

    from model import GPT, GPTConfig
    from runs.export_hf import export_model

    fields, cls = ROUND_TRIPS[variant]
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), n_layer=2, n_embd=32, n_head=4, n_kv_head=2, block_size=32,
                          init_std=0.15, **fields)).eval()
    with torch.no_grad():  # norm weights and biases away from their initial 1 and 0
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    out = export_model(model, tok, tmp_path / variant, "<|endoftext|>")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == cls
    back = load_run(f"hf:{out}").model
    idx = torch.randint(0, len(vocab), (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs, imported = model(idx).logits, hf(idx).logits.float(), back(idx).logits
    assert ours.std() > 0.5
    assert (theirs - ours).abs().max() < 1e-5 and (imported - ours).abs().max() < 1e-5
