"""ablate.py's grid: --lrs keeps each variant at the lr with the lowest mean held-out loss (checked
against the runs' own metrics.jsonl) and says which lr won; --seeds adds the spread table, whose
numbers are the mean and range of the per-run rows."""
from __future__ import annotations

import json
import statistics

import pytest
import yaml

import ablate

pytestmark = pytest.mark.usefixtures("single_thread")


def last_val_loss(run_dir) -> float:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["val_loss"] for r in rows if r.get("split") == "val"][-1]


def test_lr_and_seed_grid(tiny_run_args, tmp_path):
    out = tmp_path / "ablate"
    overrides = [a for a in tiny_run_args(3) if not a.startswith(("train.max_steps", "logging.progress"))]
    overrides += ["train.eval_interval=3", "train.ckpt_interval=3", "train.min_lr=1e-4", "train.lr=1e-3"]
    rows = ablate.main(["--configs", "configs/default.yaml", "--steps", "3", "--lrs", "1e-3", "3e-2",
                        "--seeds", "1", "2", "--threads", "1", "--out", str(out), "--stream-tokens", "40",
                        "--set", *overrides])
    data = json.loads((out / "ablation.json").read_text())
    assert len(data["all_rows"]) == 4
    runs = {(r["lr"], r["seed"]): out / r["variant"] for r in data["all_rows"]}
    assert set(runs) == {(1e-3, 1), (1e-3, 2), (3e-2, 1), (3e-2, 2)}
    for (lr, seed), run in runs.items():
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert run.name.endswith(f"_lr{lr:g}_s{seed}") and cfg["seed"] == seed
        assert cfg["train"]["lr"] == pytest.approx(lr) and cfg["train"]["min_lr"] == pytest.approx(lr / 10)
    means = {lr: statistics.mean(last_val_loss(runs[lr, s]) for s in (1, 2)) for lr in (1e-3, 3e-2)}
    won = min(means, key=means.get)
    assert means[1e-3] != means[3e-2]
    assert [(r["lr"], r["seed"]) for r in rows] == [(won, 1), (won, 2)]
    assert rows[0]["val_loss_by_lr"] == f"0.001: {means[1e-3]:.3f}, 0.03: {means[3e-2]:.3f}"
    md = (out / "ablation.md").read_text()
    assert "| lr | val loss by lr | seed |" in md and f"{won:.0e}" in md and "- **lr**: " in md
    (entry,) = data["spread"]
    sinks = [r["sink_1"] for r in rows]
    assert entry["runs"] == 2 and entry["seeds"] == [1, 2]
    assert entry["sink_1"]["mean"] == pytest.approx(statistics.mean(sinks))
    assert entry["val_loss"]["min"] == pytest.approx(min(r["val_loss"] for r in rows))
    assert "Over seeds and thread counts" in md


def test_grid_flags_refused_with_collected_runs_and_repeats(tmp_path):
    for argv in (["--runs", str(tmp_path), "--seeds", "1"], ["--configs", "configs/default.yaml", "--lrs", "1e-3", "1e-3"]):
        with pytest.raises(SystemExit) as e:
            ablate.main([*argv, "--out", str(tmp_path / "x")])
        assert e.value.code == 2
    assert not (tmp_path / "x").exists()


def test_a_run_that_stopped_early_is_refused_not_evaluated(tiny_run_args, tmp_path, monkeypatch, capsys):
    """train.py exits 0 after a SIGTERM saved a checkpoint mid-run; ablate must not take that run as done."""
    out = tmp_path / "ablate"
    overrides = [a for a in tiny_run_args(2) if not a.startswith(("train.max_steps", "logging.progress"))]
    argv = ["--configs", "configs/default.yaml", "--threads", "1", "--out", str(out), "--stream-tokens", "40",
            "--set", *overrides, "train.eval_interval=2"]
    ablate.main(["--steps", "2", *argv])
    monkeypatch.setattr(ablate.subprocess, "call", lambda *a, **k: 0)  # a training that stops at once, exit 0
    with pytest.raises(SystemExit) as e:
        ablate.main(["--steps", "4", *argv])
    assert e.value.code == 2
    assert "stopped at step 2 of 4" in capsys.readouterr().err
