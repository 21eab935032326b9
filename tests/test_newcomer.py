"""A newcomer's first hour: a short ablation that warms up within its steps, one name per setting,
--help lines that state defaults, one layer-numbering convention in the plots."""
from __future__ import annotations

from pathlib import Path

import pytest

import ablate

ROOT = Path(__file__).resolve().parents[1]


def test_short_ablation_scales_warmup_to_its_steps(tmp_path, capsys):
    (plan,) = ablate.plan_runs([str(ROOT / "configs" / "default.yaml")], 20, tmp_path, [])
    assert "train.warmup_steps=2" in plan[1] and "train.max_steps=20" in plan[1]
    assert "train.warmup_steps=2 (the config's 50, scaled to --steps 20" in capsys.readouterr().out
    (plan,) = ablate.plan_runs([str(ROOT / "configs" / "default.yaml")], 20, tmp_path, ["train.warmup_steps=5"])
    assert [a for a in plan[1] if a.startswith("train.warmup_steps=")] == ["train.warmup_steps=5"]  # --set wins
    (plan,) = ablate.plan_runs([str(ROOT / "configs" / "default.yaml")], 1000, tmp_path, [])
    assert not [a for a in plan[1] if a.startswith("train.warmup_steps=")]  # long enough: the config's


def help_lines(module: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())  # argparse wraps lines


def test_help_states_defaults():
    streaming = help_lines("eval.streaming")
    assert "(default: 4)" in streaming and "(default: 256)" in streaming and "default: window sinks recompute" in streaming
    assert "default: 0.3" in help_lines("eval.sink")
    assert "(default: 128)" in help_lines("eval.spikes") and "(default: None)" not in streaming


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_run_args):
    import os

    import train

    out = tmp_path_factory.mktemp("newcomer")
    os.environ["WANDB_MODE"] = "disabled"
    assert train.main([*tiny_run_args(2), f"out_dir={out}", "name=r", "train.sink_interval=1"]) == 0
    return out / "r"


@pytest.fixture
def figures(monkeypatch):
    """Every figure the evals save, by file name: (y label, y limits, x label, x tick labels, title) per axes."""
    import eval.plots

    seen, real = {}, eval.plots.save

    def record(fig, path):
        fig.canvas.draw()
        seen[Path(path).name] = [(ax.get_ylabel(), ax.get_ylim(), ax.get_xlabel(),
                                  [t.get_text() for t in ax.get_xticklabels()], ax.get_title()) for ax in fig.axes]
        return real(fig, path)

    monkeypatch.setattr(eval.plots, "save", record)
    return seen


def test_sink_over_steps_has_y_labels_and_no_negative_axis(two_checkpoints, figures):
    from eval import sink

    sink.main(["--ckpt", str(two_checkpoints / "checkpoints" / "step_*"), "--n-seqs", "2", "--lengths", "16"])
    panels = figures["sink_over_steps.png"]
    assert [p[0] for p in panels] == ["Sink_1^0.3 at headline_T (% of heads)", "Sink^0.3 at any position (% of heads)",
                                      "F-Attn at headline_T (weight on token 1)"]
    assert all(p[1][0] >= 0 for p in panels)  # Sink_1 of a 2-step model is 0: the axis still starts at 0


def test_layers_are_zero_indexed_in_every_plot(two_checkpoints, figures):
    from eval import activations, sink

    sink.main(["--ckpt", str(two_checkpoints), "--n-seqs", "2", "--lengths", "16", "--tag", "layers"])
    activations.main(["--ckpt", str(two_checkpoints), "--n-seqs", "2", "--tag", "layers"])
    heat = figures["sink_heatmap.png"][0]
    assert heat[0] == "layer (0-indexed, as layers.N)"
    for ylabel, _, xlabel, ticks, _ in figures["activations.png"][:3]:
        assert xlabel == "layer (0-indexed, as layers.N)" and ticks == ["0"]  # one layer: layers.0


def test_training_probe_records_its_sequence_length(two_checkpoints, figures):
    import json

    from eval import sink

    rows = [json.loads(line) for line in (two_checkpoints / "metrics.jsonl").read_text().splitlines()]
    assert [r["probe_T"] for r in rows if r.get("split") == "sink"] == [32, 32]  # block_size, not eval.sink's 64
    (result,) = sink.main(["--run", str(two_checkpoints)])
    assert result["probe_T"] == [32] and "T=64" in result["definitions"]["probe_T"]
    titles = [p[4] for p in figures["sink_emergence.png"]]
    assert titles[:2] == ["sink_1 (training probe, T=32)", "f_attn (training probe, T=32)"]
