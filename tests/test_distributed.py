"""DDP and DeepSpeed ZeRO-2/3 through Accelerate, as 2 CPU processes under torchrun (gloo).

The global batch is fixed by the config (4 sequences = 2 per process x 2 processes, or
2 x 2 accumulation in one process) and the loader draws it from (seed, step), so every launch
must produce the same losses as one process, and a resumed run the same losses as an
uninterrupted one. Runs are tiny (1 layer, width 32, 4 steps) because process start-up and
DeepSpeed's first-use op build dominate the time. The wandb test lives here too: it checks that
Accelerate's tracker receives the same rows as metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(word_corpus) -> list[str]:
    """Overrides for a tiny run on a 6-document text folder with a 300-token BPE."""
    root, corpus = word_corpus, word_corpus / "corpus"
    return [f"out_dir={root / 'out'}", f"data.cache_dir={root / 'cache'}", f"data.source={corpus}",
            "data.vocab_size=300", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
            "train.batch_size=4", "train.micro_batch_size=2", "train.max_steps=4", "train.warmup_steps=1",
            "train.eval_interval=2", "train.eval_windows=4", "train.ckpt_interval=2", "logging.progress=false"]


def launch(base: list[str], name: str, *overrides: str, procs: int = 1, deepspeed: str | None = None,
           env: dict | None = None) -> Path:
    """Run train.py (under torchrun when procs > 1); return the run dir."""
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed off
    if deepspeed:
        env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=f"configs/deepspeed/{deepspeed}.json")
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(29500 + random.randrange(1000)), "train.py"]
    else:
        cmd = [sys.executable, "train.py"]
    out = subprocess.run([*cmd, f"name={name}", *base, *overrides], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return Path(base[0].split("=", 1)[1]) / name


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def sink_rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("split") == "sink"}


def assert_sinks_close(actual: dict, expected: dict):
    """The in-training sink rows (every eval interval: steps 2 and 4) measure the same model."""
    assert actual.keys() == expected.keys() == {2, 4}, (actual, expected)
    for step, row in expected.items():
        for key in ("sink_1", "f_attn", "max_h_ratio"):
            assert abs(actual[step][key] - row[key]) <= 1e-4 * max(1.0, abs(row[key])), (step, key)


def world_size(run: Path) -> int:
    return json.loads((run / "checkpoints" / "latest" / "trainer_state.json").read_text())["world_size"]


def assert_losses_close(actual: dict, expected: dict, rtol: float = 1e-5):
    assert actual.keys() == expected.keys(), (actual, expected)
    for step, loss in expected.items():
        assert abs(actual[step] - loss) <= rtol * abs(loss), (step, actual[step], loss)


@pytest.fixture(scope="module")
def single(base) -> Path:
    """The reference: one process, the same global batch through 2 accumulation steps."""
    run = launch(base, "single")
    assert world_size(run) == 1
    return run


@pytest.mark.distributed
def test_ddp_matches_one_process_and_resumes_in_one(base, single):
    ddp = launch(base, "ddp", procs=2)
    assert world_size(ddp) == 2
    assert_losses_close(losses(ddp), losses(single))
    assert_sinks_close(sink_rows(ddp), sink_rows(single))
    # Continue the 2-process checkpoint of step 2 in 1 process: same data order, same losses.
    one = launch(base, "ddp_to_1", f"train.resume={ddp / 'checkpoints' / 'step_0000002'}")
    assert world_size(one) == 1
    assert_losses_close(losses(one), {s: v for s, v in losses(single).items() if s > 2})


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_trains_checkpoints_and_resumes(base, single, stage):
    run = launch(base, stage, procs=2, deepspeed=stage)
    assert world_size(run) == 2
    ckpt = run / "checkpoints" / "latest"
    assert (ckpt / "accelerate" / "pytorch_model").is_dir()  # DeepSpeed's own sharded state
    assert_losses_close(losses(run), losses(single))
    assert_sinks_close(sink_rows(run), sink_rows(single))  # ZeRO-3: every rank joins the measuring forward
    # The consolidated weights equal the 1-process run's (ZeRO-3 gathers its shards to write them).
    ours, ref = load_file(ckpt / "model.safetensors"), load_file(single / "checkpoints" / "latest" / "model.safetensors")
    assert ours.keys() == ref.keys()
    for k, v in ref.items():
        assert (ours[k].float() - v).abs().max().item() < 1e-5, k
    # Resume the step-2 checkpoint under the same stage: steps 3-4 as in the uninterrupted run.
    resumed = launch(base, f"{stage}_resumed", f"train.resume={run / 'checkpoints' / 'step_0000002'}",
                     procs=2, deepspeed=stage)
    assert_losses_close(losses(resumed), {s: v for s, v in losses(run).items() if s > 2}, rtol=1e-6)
    # sample.py loads the consolidated weights without DeepSpeed.
    out = subprocess.run([sys.executable, "sample.py", "--ckpt", str(run), "--prompt", "the fox",
                          "--max-new-tokens", "8", "--temperature", "0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("the fox") and len(out.stdout.strip()) > len("the fox")


def test_wandb_logs_the_same_metrics_offline(base, tmp_path):
    """logging.wandb=true goes through Accelerate's tracker; offline here, as without an API key."""
    run = launch(base, "wandb", "train.max_steps=2", "logging.wandb=true",
                 env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_API_KEY": ""})
    records = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(records) == 1
    raw = records[0].read_bytes()  # protobuf records; history values are stored as JSON text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(k, v) for r in rows for k, v in r.items() if k in ("loss", "grad_norm", "val_loss")]
    assert len(logged) == 5  # 2 x (loss, grad_norm) + 1 val_loss
    for key, value in logged:
        assert json.dumps(value).encode() in raw, (key, value)
