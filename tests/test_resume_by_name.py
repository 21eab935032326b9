"""`python train.py name=X` continues the run that lies in out/X, even when it was trained elsewhere and
copied or moved there (its config.yaml names another out_dir and name); `--resume RUN name=OTHER` is
refused (it would say "continuing" and train a new run from scratch); overrides may follow the flags."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

import train


@pytest.fixture(scope="module", autouse=True)
def _no_wandb():
    os.environ["WANDB_MODE"] = "disabled"


def steps_in(run_dir) -> list[int]:
    return sorted(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line))


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_name_resumes_a_run_moved_or_copied_into_out(tmp_path, monkeypatch, tiny_run_args, capsys, how):
    elsewhere = tmp_path / "elsewhere"
    assert train.main([*tiny_run_args(2), f"out_dir={elsewhere}", "name=rs5"]) == 0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (shutil.move if how == "moved" else lambda a, b: shutil.copytree(a, b, symlinks=True))(elsewhere / "rs5",
                                                                                             tmp_path / "out" / "rs6")
    before = sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*"))
    capsys.readouterr()
    assert train.main(["name=rs6", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    here = tmp_path / "out" / "rs6"
    assert f"continuing {os.path.join('out', 'rs6')}" in out and "resumed from" in out
    assert steps_in(here) == [1, 2, 3]  # steps 1-2 from before the move, step 3 trained here
    assert (here / "checkpoints" / "step_0000003").is_dir()
    assert yaml.safe_load((here / "config.yaml").read_text())["out_dir"] == "out"
    assert sorted(p.relative_to(elsewhere) for p in elsewhere.rglob("*")) == before  # nothing written there


def test_resume_with_another_name_is_refused(tmp_path, tiny_run_args, capsys):
    run = tmp_path / "out" / "rs5"
    assert train.main([*tiny_run_args(1), f"out_dir={run.parent}", "name=rs5"]) == 0
    capsys.readouterr()
    for extra in (["name=rs5other"], [f"out_dir={tmp_path / 'else'}"]):
        assert train.main(["--resume", str(run), *extra, "train.max_steps=2"]) == 2
        err = capsys.readouterr().err
        assert "continues that run in place" in err and "train.resume=" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "rs5other").exists() and not (tmp_path / "else").exists()
    assert not (run / "checkpoints" / "step_0000002").exists()
    # The same name (however spelled) continues the run.
    assert train.main(["--resume", str(run), "name=rs5", "train.max_steps=2"]) == 0
    assert (run / "checkpoints" / "step_0000002").is_dir()


def test_overrides_may_follow_the_flags(capsys):
    assert train.main(["model.n_layer=2", "--print-config", "train.lr=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["n_layer"] == 2 and printed["train"]["lr"] == 0.5
