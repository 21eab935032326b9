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
import trainer.loop
from trainer.checkpoint import write_manifest

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
    (root / "dup.yaml").write_text("train:\n  lr: 0.1\n  max_steps: 2\n  lr: 0.2\n")
    (root / "cycle_a.yaml").write_text("base: cycle_b.yaml\n")
    (root / "cycle_b.yaml").write_text("base: cycle_a.yaml\n")
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
    "infinite lr": (["train.lr=.inf"], ["train.lr=inf is not a finite number"]),
    "nan norm eps": (["model.norm_eps=.nan"], ["model.norm_eps=nan is not a finite number"]),
    "infinite weight decay": (["train.weight_decay=.inf"], ["train.weight_decay=inf is not a finite number"]),
    "nan grad clip": (["train.grad_clip=.nan"], ["train.grad_clip=nan is not a finite number"]),
    "fp16 on cpu": (["train.mixed_precision=fp16"], ["train.mixed_precision=fp16 needs a CUDA GPU", "=bf16 or no"]),
    "negative init_std": (["model.init_std=-0.1"], ["model.init_std must be > 0"]),
    "negative intermediate_size": (["model.intermediate_size=-4"], ["model.intermediate_size must be null"]),
    "name escapes out_dir": (["name=.."], ["name='..' must be a plain folder name inside out_dir"]),
    "name with a separator": (["name=a/../../b"], ["name='a/../../b' must be a plain folder name"]),
    "duplicate yaml key": (["--config", "{files}/dup.yaml"], ["dup.yaml: key 'lr' appears twice", "line 4"]),
    "base cycle": (["--config", "{files}/cycle_a.yaml"], ["cycle_a.yaml is its own base", "closes the cycle"]),
    "out_dir a file": (["out_dir={files}/tokenizer.json"], ["tokenizer.json is a file, not a folder"]),
    "cache_dir a file": (["data.cache_dir={files}/tokenizer.json"], ["tokenizer.json is a file, not a directory"]),
    "init_from not hf": (["train.init_from=out/other"], ["train.init_from: out/other holds no checkpoint"]),
    "init_from missing folder": (["train.init_from=hf:{files}/nope"], ["train.init_from: hf:", "no such file or folder"]),
    "lr_scale malformed": (["train.lr_scale=sinks:100"], ["train.lr_scale entry 'sinks:100' must look like part=factor"]),
    "train_only unmatched": (["train.train_only=no_such_param"], ["train.train_only='no_such_param' matches no parameter"]),
    "init_from missing gguf": (["train.init_from=hf:{files}/nope.gguf"], ["no such GGUF file"]),
}


BAD_DATA = {"missing data", "empty corpus", "binary corpus", "missing tokenizer", "broken tokenizer"}
SUBPROCESS = {"unknown key", "binary corpus"}  # the rest in-process through the same entry point, train.main


@pytest.mark.parametrize("case", list(CASES))
def test_train_rejects(tmp_path, files, case, capsys):
    args, words = CASES[case]
    args = [a.format(files=files) for a in args]
    config, overrides = (args[:2], args[2:]) if args[0] == "--config" else ([], args)
    out_dir, cache = tmp_path / "out", tmp_path / "cache"
    argv = [*config, *TINY, f"out_dir={out_dir}", f"data.cache_dir={cache}", "name=r", *overrides]
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


def test_sample_crops_a_prompt_longer_than_the_context_as_nanogpt(trained):
    """Past block_size each greedy token is the argmax of a forward over the last 32 tokens."""
    import torch

    from runs.load import load_run

    prompt = "the fox " * 40
    res = run(["sample.py", "--ckpt", str(trained), "--prompt", prompt, "--max-new-tokens", "5", "--temperature", "0"])
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "exceed the context of 32" in res.stderr and "cropped" in res.stderr and "--n-sink 4" in res.stderr
    loaded = load_run(trained)
    ids = loaded.tokenizer.encode(prompt).ids
    assert len(ids) > 32
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(loaded.model(torch.tensor([ids[-32:]])).logits[0, -1].argmax()))
    assert res.stdout == loaded.tokenizer.decode(ids) + "\n"


def test_sample_takes_n_sink_and_its_older_name_sink_cache(trained):
    outs = [run(["sample.py", "--ckpt", str(trained), name, "2", "--window", "20", "--max-new-tokens", "40",
                 "--temperature", "0"]) for name in ("--n-sink", "--sink-cache")]
    assert [r.returncode for r in outs] == [0, 0] and outs[0].stdout == outs[1].stdout


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


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: equal snapshots = nothing was written."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_write_failure_at_start_is_one_line(tmp_path, files, monkeypatch, capsys):
    def disk_full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.loop, "write_atomic", disk_full)
    out_dir = tmp_path / "out"
    code = train.main([*TINY, f"data.source={files}/good", f"out_dir={out_dir}", f"data.cache_dir={tmp_path}/cache"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "set out_dir to a writable folder" in err
    assert "Traceback" not in err and not out_dir.exists()  # the half-made run dir is gone again


def test_vit_configs_refuse_a_bad_mlp_width_or_init_scale():
    from configs import ConfigError, load_config

    for override, words in (("model.init_std=-0.1", "model.init_std must be > 0"),
                            ("model.intermediate_size=0", "model.intermediate_size must be null")):
        with pytest.raises(ConfigError, match=words):
            load_config(ROOT / "configs" / "vit_digits.yaml", [override])


def test_micro_batch_shrinks_to_fit_the_processes():
    from configs import ConfigError
    from trainer.launch import fit_micro_batch

    said = []
    assert fit_micro_batch(16, 16, 2, said.append) == 8 and "running micro batches of 8" in said[0]
    assert fit_micro_batch(16, 6, 1, said.append) == 4  # the largest divisor of 16 below 6
    assert fit_micro_batch(12, 4, 3, said.append) == 4 and len(said) == 2  # fits: unchanged, nothing said
    with pytest.raises(ConfigError, match="train.batch_size=15 must be divisible by the number of processes"):
        fit_micro_batch(15, 4, 2)


def test_val_loss_does_not_depend_on_the_micro_batch(tmp_path, files):
    """The eval set is train.eval_windows windows whatever the micro batch: same model, same val_loss."""
    from configs import load_config

    losses = []
    for micro in (2, 4):
        cfg = load_config(None, [*TINY, "train.batch_size=4", f"train.micro_batch_size={micro}", "train.eval_windows=6",
                                 f"data.source={files}/good", f"out_dir={tmp_path}/out", f"data.cache_dir={tmp_path}/c",
                                 f"name=mb{micro}"])
        losses.append(train.Trainer(cfg).evaluate()["val_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_plain_progress_lines_and_the_report_says_better_or_worse(tmp_path, files, capsys):
    from trainer.tasks import LMTask

    code = train.main([*TINY, "train.max_steps=3", "logging.log_interval=2", f"data.source={files}/good",
                       f"out_dir={tmp_path}/out", f"data.cache_dir={tmp_path}/cache", "name=r"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("step ") and "|" in line]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/3", "step 3/3"]  # every 2 steps and the last
    assert all(k in lines[0] for k in (" | loss ", " | lr ", " tok/s | ETA "))
    task = LMTask(None)
    task.meta = {"unigram_val_nll": 5.0}
    assert "2.50 nats worse than the baseline" in task.final_report({"val_loss": 7.5}, Path("r"))
    assert "1.00 nats better than the baseline" in task.final_report({"val_loss": 4.0}, Path("r"))


def test_export_refuses_an_out_path_that_is_a_file(tmp_path, trained):
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep me")
    res = run(["-m", "runs.export_hf", "--ckpt", str(trained), "--out", str(target)])
    assert res.returncode == 2 and "Traceback" not in res.stderr and "wrote" not in res.stdout
    assert "is a file, not a folder" in res.stderr and target.read_bytes() == b"keep me"


@pytest.mark.parametrize("flags, words", [
    (["--device", "cuda"], "use --device cpu"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--top-k", "0"], "--top-k must be >= 1"),
])
def test_sample_rejects_bad_flags_before_loading(trained, flags, words, capsys):
    import sample

    if flags[0] == "--device" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert sample.main(["--ckpt", str(trained), *flags]) == 2
    captured = capsys.readouterr()
    assert words in captured.err and captured.out == ""


def test_a_gpu_only_backend_loads_as_auto_on_cpu(tmp_path, trained, capsys):
    import yaml

    from runs.load import load_run

    run_dir = tmp_path / "r"
    shutil.copytree(trained, run_dir, symlinks=True)
    config = (run_dir / "checkpoints" / "latest").resolve() / "config.yaml"
    values = yaml.safe_load(config.read_text())
    values["model"]["backend"] = "flash"
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    write_manifest(config.parent)  # as a save on a GPU machine wrote it
    run = load_run(run_dir)
    assert run.model.config.backend == "auto" and "model.backend=flash, which cannot run here" in capsys.readouterr().err


EVAL_FLAGS = [
    ("sink", ["--lengths", "0"], "argument --lengths: must be a positive integer, got 0"),
    ("sink", ["--k", "0"], "argument --k: must be a positive integer"),
    ("sink", ["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    ("sink", ["--n-seqs", "0"], "argument --n-seqs: must be a positive integer"),
    ("activations", ["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    ("streaming", ["--window", "-3"], "argument --window: must be a positive integer, got -3"),
    ("spikes", ["--window", "-3"], "argument --window: must be a positive integer, got -3"),
    ("ablate", ["--stream-tokens", "0"], "argument --stream-tokens: must be a positive integer"),
]


@pytest.mark.parametrize("module, flags, words", EVAL_FLAGS, ids=[f"{m} {' '.join(f)}" for m, f, _ in EVAL_FLAGS])
def test_evals_reject_bad_flags_before_any_work(tmp_path, trained, module, flags, words, capsys):
    import importlib

    run_dir = tmp_path / "r"
    shutil.copytree(trained, run_dir, symlinks=True)
    before = snapshot(run_dir)
    ckpt = ["--runs" if module == "ablate" else "--ckpt", str(run_dir)]
    with pytest.raises(SystemExit) as exit:
        importlib.import_module("ablate" if module == "ablate" else f"eval.{module}").main([*ckpt, *flags])
    assert exit.value.code == 2 and words in capsys.readouterr().err
    assert snapshot(run_dir) == before


def test_evals_on_an_unwritable_run_dir_or_moved_data_say_so(tmp_path, trained, monkeypatch, capsys):
    import pathlib

    import yaml

    from eval import activations

    run_dir = tmp_path / "r"
    shutil.copytree(trained, run_dir, symlinks=True)
    before = snapshot(run_dir)
    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):  # (root ignores chmod, so the file system's answer is simulated)
        if self.is_relative_to(run_dir):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "mkdir", read_only)
        with pytest.raises(SystemExit) as exit:
            activations.main(["--ckpt", str(run_dir)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Permission denied" in err and "copy the run to a writable place" in err
    assert snapshot(run_dir) == before

    config = (run_dir / "checkpoints" / "latest").resolve() / "config.yaml"
    values = yaml.safe_load(config.read_text())
    values["data"].update(source=str(tmp_path / "moved"), cache_dir=str(tmp_path / "empty_cache"))
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    write_manifest(config.parent)  # a run whose data was elsewhere when it saved
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exit:
        activations.main(["--ckpt", str(run_dir)])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "path does not exist" in err and "--data" in err and "Traceback" not in err
    assert snapshot(run_dir) == before


def test_refused_resume_leaves_no_run_dir_behind(tmp_path, files, capsys):
    """A fresh run refused during set-up (here: train.resume names no checkpoint) removes the run
    dir its lock created, so nothing is left for the next run to trip over."""
    out_dir = tmp_path / "out"
    code = train.main([*TINY, f"data.source={files}/good", f"out_dir={out_dir}", f"data.cache_dir={tmp_path}/cache",
                       f"train.resume={tmp_path}/no_such_checkpoint"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "no_such_checkpoint" in err
    assert not out_dir.exists()
