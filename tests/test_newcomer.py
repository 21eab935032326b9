"""A newcomer's first hour: a short ablation that warms up within its steps, one name per setting,
--help lines that state defaults, one layer-numbering convention in the plots."""
from __future__ import annotations

from pathlib import Path

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
