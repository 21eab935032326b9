"""Imports never mislead: a damaged transformers folder, a stray weight file, an unreachable hub
dataset and a vanished init_from folder are each one line or a correct result, never a traceback or
silently wrong weights. Tiny transformers models are built by the test (tests/hf_models.py); nothing
touches the network.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import sample
import train
from tests.hf_models import save_tiny


@pytest.fixture(scope="module", autouse=True)
def _no_wandb():
    os.environ["WANDB_MODE"] = "disabled"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("hf") / "llama")


def edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# What each damage does to the folder, and the file the refusal must name with what is wrong.
DAMAGES = {
    "truncated weights": (lambda f: cut(f / "model.safetensors", 0.5), "model.safetensors", "truncated or damaged"),
    "empty weights": (lambda f: cut(f / "model.safetensors", 0.0), "model.safetensors", "truncated or damaged"),
    "sizes disagree": (lambda f: edit_json(f / "config.json", intermediate_size=48), "config.json", "disagrees"),
    "half a config": (lambda f: cut(f / "config.json", 0.5), "config.json", "not valid JSON"),
    "vocab below the tokenizer's": (lambda f: edit_json(f / "config.json", vocab_size=100), "config.json",
                                    "smaller than the tokenizer"),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json", "no tokenizer"),
    "truncated tokenizer": (lambda f: cut(f / "tokenizer.json", 0.5), "tokenizer.json", "not valid JSON"),
}


def test_1_a_damaged_folder_is_one_line_naming_the_file_in_every_cli(llama, tmp_path, capsys):
    from eval import sink

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    for what, (damage, name, problem) in DAMAGES.items():
        folder = tmp_path / what.replace(" ", "_")
        shutil.copytree(llama, folder)
        damage(folder)
        out = tmp_path / f"out_{folder.name}"
        runs = {
            "sample.py": lambda: sample.main(["--ckpt", f"hf:{folder}", "--max-new-tokens", "2"]),
            "train.init_from": lambda: train.main([f"train.init_from=hf:{folder}", f"data.source={corpus}",
                                                   f"data.cache_dir={tmp_path / 'cache'}", f"out_dir={out}",
                                                   "logging.progress=false"]),
            "eval.sink": lambda: sink.main(["--ckpt", f"hf:{folder}", "--data", str(corpus)]),
        }
        for cli, run in runs.items():
            capsys.readouterr()
            try:
                code = run()
            except SystemExit as e:
                code = e.code
            err = capsys.readouterr().err.strip()
            assert code == 2, f"{what} via {cli}: exit {code}, stderr {err[-400:]}"
            lines = [line for line in err.splitlines() if line.startswith("error:")]
            assert len(lines) == 1, f"{what} via {cli}: {err[-400:]}"
            assert name in lines[0] and problem in lines[0], f"{what} via {cli}: {lines[0]}"
            assert "Traceback" not in err and "Error" not in err.replace(lines[0], ""), err[-400:]
        assert not out.exists(), f"{what}: train.py wrote {out}"
        assert not (Path("out") / "hf" / folder.name).exists(), f"{what}: eval.sink wrote results"


def test_2_only_the_files_transformers_reads_are_read(llama, tmp_path, monkeypatch):
    """A stray model_fp16.safetensors beside model.safetensors is ignored, as from_pretrained ignores it;
    a sharded folder reads exactly its index's shards; the hub download asks for those files only."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from model.interop import hf_import
    from runs.load import load_run

    folder = tmp_path / "stray"
    shutil.copytree(llama, folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v + 1.0 for k, v in weights.items()}, str(folder / "model_fp16.safetensors"))
    ids = torch.tensor([[5, 9, 40, 77, 3, 120, 64]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder).float().eval()(ids).logits
        got = load_run(f"hf:{folder}").model(ids).logits
    assert (got - want).abs().max().item() < 1e-4

    # Sharded: two shards listed by the index, and a stray shard that it does not list.
    sharded = tmp_path / "sharded"
    shutil.copytree(llama, sharded, ignore=shutil.ignore_patterns("model*.safetensors"))
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(sharded / shard))
    save_file({k: v * 0 for k, v in weights.items()}, str(sharded / "model-00003-of-00003.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    with torch.no_grad():
        assert (load_run(f"hf:{sharded}").model(ids).logits - want).abs().max().item() < 1e-4

    # The hub download: config and tokenizer first, then exactly the index's shards.
    asked = []

    def fake_snapshot(repo, allow_patterns):
        asked.append(list(allow_patterns))
        return str(sharded)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert hf_import.hf_folder("hf:owner/sharded") == sharded
    fetched = {p for call in asked for p in call if "safetensors" in p and not p.endswith(".json")}
    assert fetched == {"model.safetensors", *shards}, asked
    assert not any("*" in p and "safetensors" in p for call in asked for p in call), asked


def test_3_an_unreachable_hub_dataset_is_one_line(tmp_path, monkeypatch, capsys):
    """Offline, `data.source=owner/name`, eval `--data owner/name` and an lm-eval task whose dataset is on the
    hub are each one line naming what could not be reached."""
    import datasets
    import huggingface_hub

    from eval import harness, sink

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time: no retries
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty cache: nothing to fall back on
    missing = "nobody-here/no-such-dataset"

    def one_error_line(run):
        capsys.readouterr()
        try:
            code = run()
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-1000:]
        return lines[0]

    line = one_error_line(lambda: train.main([f"data.source={missing}", f"data.cache_dir={tmp_path / 'cache'}",
                                              f"out_dir={tmp_path / 'out'}", "logging.progress=false"]))
    assert missing in line and "hub" in line
    assert not (tmp_path / "out").exists()

    model = save_tiny("qwen2", tmp_path / "model")
    line = one_error_line(lambda: sink.main(["--ckpt", f"hf:{model}", "--data", missing]))
    assert missing in line and "hub" in line

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "remote.yaml").write_text(
        f"task: sinklab_remote\ndataset_path: {missing}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
    line = one_error_line(lambda: harness.main(["--ckpt", f"hf:{model}", "--tasks", "sinklab_remote",
                                                "--include-path", str(tmp_path / "tasks"), "--limit", "2"]))
    assert "sinklab_remote" in line and missing in line


def test_4_an_init_from_run_resumes_without_its_folder(tmp_path, capsys):
    """The checkpoint holds weights, model config and tokenizer: the import's folder is not needed to resume,
    and the resumed run equals the uninterrupted one."""
    folder = save_tiny("llama", tmp_path / "gone")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(4):
        (corpus / f"doc{d}.txt").write_text(" ".join(["the quick brown fox jumps over a lazy dog"] * 60) + "\n")

    def run(name, steps, *extra):
        argv = [f"train.init_from=hf:{folder}", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                f"out_dir={tmp_path / 'out'}", f"name={name}", "model.block_size=16", "train.batch_size=2",
                "train.micro_batch_size=2", "train.max_steps=4", "train.warmup_steps=1", "train.eval_windows=2",
                f"train.ckpt_interval={steps}", "train.sink_interval=0", "logging.progress=false", *extra]
        return train.main(argv)

    def losses(name):
        rows = [json.loads(line) for line in (tmp_path / "out" / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert run("whole", 2) == 0
    shutil.copytree(tmp_path / "out" / "whole", tmp_path / "out" / "parts", symlinks=True)
    parts = tmp_path / "out" / "parts" / "checkpoints"
    for step in (3, 4):
        shutil.rmtree(parts / f"step_{step:07d}", ignore_errors=True)
    (parts / "latest").unlink()
    (parts / "latest").symlink_to("step_0000002")
    shutil.rmtree(folder)
    capsys.readouterr()
    assert run("parts", 2) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "resumed from" in out
    assert [losses("parts")[s] for s in (3, 4)] == [losses("whole")[s] for s in (3, 4)]
