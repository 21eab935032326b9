"""Every user mistake gets one clear message, a non-zero exit, no traceback, and writes nothing.

sample.py cases and two train.py cases run the real command line in a subprocess (exit code and
terminal output are the behaviour under test); the other train.py cases call the same entry
point, train.main, in-process to keep the suite fast.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog and cat sat on mat while bird sings of night day sun moon".split()
TINY = ["data.vocab_size=300", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
        "train.batch_size=2", "train.micro_batch_size=2", "train.max_steps=2", "train.eval_windows=2",
        "logging.progress=false"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"},
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A good corpus, an empty one, one with a binary file, and a broken tokenizer.json."""
    root = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    for name in ("good", "empty", "binary"):
        (root / name).mkdir()
    for d in range(6):
        (root / "good" / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(400)) + "\n")
    (root / "empty" / "a.txt").write_text("")
    (root / "empty" / "b.txt").write_text("  \n\n")
    (root / "binary" / "text.txt").write_text("some text\n")
    (root / "binary" / "image.txt").write_bytes(bytes(range(256)) * 8)
    (root / "tokenizer.json").write_text('{"model": ')
    (root / "bad.yaml").write_text("model: [unclosed\n")
    return root


CASES = {  # id: (arguments, words the message must contain)
    "unknown key": (["train.batch_sizee=4"], ["unknown config key train.batch_sizee", "did you mean train.batch_size"]),
    "bad value": (["model.attention=cosine"], ["model.attention='cosine'", "softmax", "sigmoid"]),
    "wrong type": (["train.lr=fast"], ["train.lr='fast'", "expected float"]),
    "bad override": (["train.lr"], ["section.key=value"]),
    "missing config": (["--config", "{files}/nope.yaml"], ["nope.yaml does not exist"]),
    "broken yaml": (["--config", "{files}/bad.yaml"], ["not valid YAML"]),
    "missing data": (["data.source={files}/nowhere"], ["data.source=", "path does not exist"]),
    "empty corpus": (["data.source={files}/empty"], ["the corpus is empty"]),
    "binary corpus": (["data.source={files}/binary"], ["image.txt is a binary file", "remove it from data.source"]),
    "vocab too small": (["data.source={files}/good", "model.vocab_size=100"],
                        ["model.vocab_size=100 is smaller than the tokenizer's vocabulary (300)"]),
    "missing tokenizer": (["data.source={files}/good", "data.tokenizer={files}/nope.json"],
                          ["data.tokenizer=", "does not exist"]),
    "broken tokenizer": (["data.source={files}/good", "data.tokenizer={files}/tokenizer.json"],
                         ["is not a valid tokenizer.json"]),
    "context longer than data": (["data.source={files}/good", "model.block_size=5000"],
                                 ["fewer than model.block_size + 1 = 5001", "lower model.block_size"]),
    "unknown lr schedule": (["train.lr_schedule=linear"], ["train.lr_schedule='linear'", "cosine", "wsd"]),
    "wsd decay fraction": (["train.lr_schedule=wsd", "train.decay_fraction=1.5"],
                           ["train.decay_fraction must be in (0, 1]"]),
    "warmup into the wsd decay": (["train.lr_schedule=wsd", "train.warmup_steps=2"],  # 2 steps: decay from 1.6
                                  ["train.warmup_steps=2 runs into the wsd decay", "lower train.warmup_steps"]),
    "negative sink interval": (["train.sink_interval=-1"], ["train.sink_interval must be >= 0 (0 = off)"]),
}


BAD_DATA = {"missing data", "empty corpus", "binary corpus", "missing tokenizer", "broken tokenizer"}
SUBPROCESS = {"unknown key", "binary corpus"}  # the rest in-process through the same entry point, train.main


@pytest.mark.parametrize("case", list(CASES))
def test_train_rejects(tmp_path, files, case, capsys):
    args, words = CASES[case]
    args = [a.format(files=files) for a in args]
    config, overrides = (args[:2], args[2:]) if args[0] == "--config" else ([], args)
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    argv = [*config, *TINY, *overrides, f"out_dir={out_dir}", f"data.cache_dir={cache}", "name=r"]
    if case in SUBPROCESS:
        res = run(["train.py", *argv])
        code, err = res.returncode, res.stderr
        assert "Traceback" not in err
    else:
        os.environ["WANDB_MODE"] = "disabled"
        code, err = train.main(argv), capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "error: " in err
    for w in words:
        assert w in err, (w, err[-2000:])
    assert not out_dir.exists()  # nothing written for the run
    if cache.exists():  # no half-prepared dataset left behind (a complete one is a reusable cache)
        assert not [p for p in cache.iterdir() if ".tmp-" in p.name], list(cache.iterdir())  # (.lock files may stay)
        if case in BAD_DATA:
            assert not [p for p in cache.iterdir() if (p / "meta.json").exists()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, files) -> Path:
    out = tmp_path_factory.mktemp("trained")
    res = run(["train.py", *TINY, f"data.source={files}/good", f"out_dir={out}", f"data.cache_dir={out}/cache",
               "name=r"])
    assert res.returncode == 0, res.stderr[-2000:]
    return out / "r"


def test_sample_rejects_a_prompt_longer_than_the_context(trained):
    res = run(["sample.py", "--ckpt", str(trained), "--prompt", "the fox " * 40, "--max-new-tokens", "5"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "exceed the model's context of 32 tokens" in res.stderr and "--sink-cache" in res.stderr
    assert res.stdout == ""  # nothing generated


def test_sample_rejects_a_missing_run_and_prompt_file(tmp_path, trained):
    res = run(["sample.py", "--ckpt", str(tmp_path / "nope")])
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    res = run(["sample.py", "--ckpt", str(trained), "--prompt-file", str(tmp_path / "nope.txt")])
    assert res.returncode == 2 and "nope.txt" in res.stderr and "Traceback" not in res.stderr


def test_sample_rejects_damaged_weights(tmp_path, trained):
    run_dir = tmp_path / "r"
    shutil.copytree(trained, run_dir, symlinks=True)
    weights = (run_dir / "checkpoints" / "latest").resolve() / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    res = run(["sample.py", "--ckpt", str(run_dir)])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "model.safetensors is damaged" in res.stderr and res.stdout == ""
