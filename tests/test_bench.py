"""python -m bench runs end to end on the CPU at tiny shapes and writes its JSON; bad flags fail
cleanly; the nanoGPT baseline has GPT-2's parameter count and is causal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.nanogpt_baseline import NanoGPT, NanoGPTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--lengths", "32", "--batch", "2", "--vocab", "64",
        "--warmup", "1", "--reps", "2"]


def bench(*args, out: Path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cpu_suite_runs_and_writes_json(tmp_path):
    proc = bench("--suite", "cpu", "--check", "--kinds", "softmax", "sigmoid", "linear", "--gates", "none",
                 "elementwise", *TINY, out=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(tmp_path.glob("bench-cpu-*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert result["check"]["pass"] and {r["backend"] for r in result["check"]["rows"]} >= {"sdpa", "flex", "chunked"}
    assert all(r["out"] < 1e-4 for r in result["check"]["rows"])
    rows = {r["model"]: r for r in result["train"]}
    assert set(rows) == {"softmax/none", "nanogpt", "sigmoid/none", "linear/none", "softmax/elementwise",
                         "sigmoid/elementwise", "linear/elementwise"}
    for r in rows.values():
        assert len(r["step_ms_all"]) == 2 and r["step_ms"] > 0
        assert r["tok_per_s"] == pytest.approx(2 * 32 / (r["step_ms"] / 1e3))
    assert rows["softmax/none"]["vs_softmax"] == 1.0
    assert "| nanogpt |" in proc.stdout
    assert "streaming" not in result  # the slow token-by-token row only with --streaming


def test_streaming_row(tmp_path, capsys):
    """The streaming row on a tiny random Llama: three speeds of the same stream, their ratios, and
    NLL agreement (parallel == token-by-token; ours == transformers' before the first eviction)."""
    from bench import __main__ as bench_cli

    assert bench_cli.main(["--skip", "kernels", "train", "nanogpt", "--streaming", *TINY, "--stream-tokens", "80",
                           "--stream-window", "12", "--stream-chunk", "16", "--out", str(tmp_path)]) == 0
    row, = json.loads(next(tmp_path.glob("bench-cpu-*.json")).read_text())["streaming"]
    assert row["model"] == "random llama" and row["tokens"] == 80 and row["cache"] == "4+12"
    assert row["parallel_vs_token_by_token"] == pytest.approx(row["parallel_tok_s"] / row["token_by_token_tok_s"])
    assert row["parallel_vs_hf_decode"] == pytest.approx(row["parallel_tok_s"] / row["hf_decode_tok_s"])
    assert row["max_nll_diff_parallel_vs_token_by_token"] < 1e-5
    assert row["max_nll_diff_vs_hf_before_eviction"] < 1e-4
    assert "| random llama | 80 | 4+12 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench_cli.main(["--skip", "kernels", "train", "nanogpt", "--stream-model", str(tmp_path / "nope")])
    assert e.value.code == 2 and "not a transformers folder" in capsys.readouterr().err


def test_cpu_suite_leaves_out_the_streaming_row_unless_asked(tmp_path, capsys):
    """The cpu suite's streaming row decodes token by token for 20+ minutes at its default shapes: only on request."""
    from bench import __main__ as bench_cli

    assert bench_cli.main(["--suite", "cpu", "--skip", "kernels", "nanogpt", "--kinds", "softmax", "--gates", "none",
                           *TINY, "--out", str(tmp_path)]) == 0
    assert "streaming" not in json.loads(next(tmp_path.glob("bench-cpu-*.json")).read_text())
    assert "add --streaming to run it" in capsys.readouterr().err


def test_gpu_suite_shape_runs_on_cpu(tmp_path):
    """The GPU suite's code path (kernel table, training rows) at tiny shapes on the CPU."""
    proc = bench("--suite", "gpu", "--device", "cpu", "--kinds", "softmax", "linear", "--gates", "none", "headwise",
                 "--skip", "streaming", *TINY, out=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("bench-gpu-*.json")).read_text())
    kernels = {(r["variant"], r["backend"]): r for r in result["kernels"]}
    assert set(kernels) >= {("softmax", "sdpa"), ("softmax", "math"), ("linear", "math"), ("linear", "chunked")}
    assert kernels[("softmax", "sdpa")]["fwd_bwd_x"] == 1.0
    train = {r["model"]: r for r in result["train"]}
    assert set(train) == {"softmax/none", "nanogpt", "linear/none", "softmax/headwise", "linear/headwise"}
    ratio = train["softmax/headwise"]["step_ms"] / train["softmax/none"]["step_ms"]
    assert train["softmax/headwise"]["vs_softmax"] == pytest.approx(ratio)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    proc = bench("--device", "cuda", *TINY, out=tmp_path / "b")
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


def test_bad_shape_is_a_clear_error(tmp_path):
    proc = bench("--suite", "cpu", "--lengths", "0", out=tmp_path / "b")
    assert proc.returncode == 2 and "--lengths must be positive" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_nanogpt_has_gpt2_small_parameter_count_and_is_causal():
    with torch.device("meta"):  # 124M parameters without allocating them
        big = NanoGPT(NanoGPTConfig(vocab_size=50257, block_size=1024))
    assert sum(p.numel() for p in big.parameters()) == 124_439_808  # GPT-2 small, wte tied to lm_head
    model = NanoGPT(NanoGPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 40, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 40
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])


def test_hashes_bench_agrees_with_the_checkpoint_manifest(tmp_path, capsys):
    """bench.hashes times the hash the manifest uses, computing the same digest as trainer.checkpoint.file_hash."""
    from bench import hashes
    from trainer.checkpoint import file_hash

    f = tmp_path / "w.bin"
    f.write_bytes(bytes(range(256)) * 40000)  # 10 MB: more than two read chunks
    assert hashes.candidates()["xxh3_64"](f) == file_hash(f)
    assert hashes.main(["--mb", "1", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert all(f"| {name} |" in table for name in ("xxh3_64", "crc32", "sha256", "blake2b"))
