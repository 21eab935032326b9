"""End to end: every attention kind learns on the embedded corpus, and sample.py runs on the result."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
KINDS = [("softmax", "none"), ("sigmoid", "none"), ("elu1", "none"), ("linear", "none"),
         ("softmax", "elementwise"), ("sigmoid", "headwise")]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


def tiny_run(tmp_path: Path, cache_dir: Path, name: str, *overrides: str) -> Path:
    """Train a tiny model on the embedded Shakespeare with a small vocabulary; return its run dir."""
    os.environ["WANDB_MODE"] = "disabled"
    args = [f"name={name}", f"out_dir={tmp_path}", f"data.cache_dir={cache_dir}", "data.vocab_size=512",
            "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64",
            "train.batch_size=8", "train.micro_batch_size=8", "train.max_steps=40", "train.warmup_steps=5",
            "train.lr=3e-3", "train.min_lr=3e-4", "train.eval_interval=20", "train.eval_windows=32",
            "train.ckpt_interval=40", "logging.progress=false", *overrides]
    assert train.main(args) == 0
    return tmp_path / name


def read_metrics(run_dir: Path):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


@pytest.mark.parametrize("attention,gate", KINDS)
def test_every_kind_lowers_the_loss(tmp_path, cache_dir, attention, gate):
    run = tiny_run(tmp_path, cache_dir, f"{attention}_{gate}", f"model.attention={attention}", f"model.gate={gate}")
    steps, evals = read_metrics(run)
    assert [r["step"] for r in steps] == list(range(1, 41))
    first = sum(r["loss"] for r in steps[:5]) / 5
    last = sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first - 0.8, (first, last)  # ln(512) = 6.2 at the start
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    sinks = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("split") == "sink"]
    assert [r["step"] for r in sinks] == [20, 40]  # train.sink_interval defaults to the eval interval
    assert all(0 <= r["sink_1"] <= 100 and 0 < r["f_attn"] < 1 and r["max_h_ratio"] >= 1 for r in sinks)
    ckpt = run / "checkpoints" / "latest"
    assert (ckpt / "model.safetensors").is_file() and json.loads((ckpt / "trainer_state.json").read_text())["step"] == 40


def test_sample_end_to_end(tmp_path, cache_dir):
    run = tiny_run(tmp_path, cache_dir, "for_sampling")
    cmd = [sys.executable, "sample.py", "--ckpt", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "20",
           "--seed", "3", "--num-samples", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    samples = out.stdout.split("-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("ROMEO:") and len(s) > len("ROMEO:") + 10 for s in samples)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.stdout == out.stdout  # --seed makes sampling reproducible
    # A sink cache generates past the context length (64 here).
    long = subprocess.run([sys.executable, "sample.py", "--ckpt", str(run), "--prompt", "ROMEO:",
                           "--max-new-tokens", "150", "--sink-cache", "4", "--window", "28", "--temperature", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert long.returncode == 0, long.stderr
    # Without one it crops to the last 64 tokens, as nanoGPT, and says so.
    cropped = subprocess.run([sys.executable, "sample.py", "--ckpt", str(run), "--prompt", "ROMEO:",
                              "--max-new-tokens", "150"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert cropped.returncode == 0 and "exceed the context of 64" in cropped.stderr and "Traceback" not in cropped.stderr


def test_config_errors_name_the_key(tmp_path, cache_dir, capsys):
    base = [f"out_dir={tmp_path}", f"data.cache_dir={cache_dir}"]
    assert train.main([*base, "model.atention=sigmoid"]) == 2
    assert "model.atention" in capsys.readouterr().err
    assert train.main([*base, "model.attention=cosine"]) == 2
    err = capsys.readouterr().err
    assert "model.attention" in err and "sigmoid" in err and "softmax" in err
    assert train.main([*base, "train.max_steps=many"]) == 2
    assert "train.max_steps" in capsys.readouterr().err
    assert train.main([*base, f"data.source={tmp_path / 'missing.txt'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("  \n")
    assert train.main([*base, f"data.source={tmp_path / 'empty.txt'}"]) == 2
    assert "empty" in capsys.readouterr().err
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # no run dir was created


def test_compiled_run_writes_plain_weights(tmp_path, cache_dir, monkeypatch):
    """train.compile=true wraps the model (torch.compile's `_orig_mod.` names); its checkpoints
    must still load into a plain model. The eager backend keeps the wrapper but skips codegen."""
    import functools

    import torch

    from runs.load import load_run

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    run = tiny_run(tmp_path, cache_dir, "compiled", "train.compile=true", "train.max_steps=4")
    loaded = load_run(run, task="lm")
    assert not any("_orig_mod" in k for k in loaded.model.state_dict())
    steps, _ = read_metrics(run)
    assert len(steps) == 4
