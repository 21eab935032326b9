"""train.init_from=hf:... applies or refuses every model.* setting, fresh and on resume, never drops one:
the import fixes the architecture, so a run that asks for another n_layer, attention, qk_norm,
rope_theta, ... is refused naming it (as a plain run's resume is), while the settings it can take (the
training window, the backend, a retrofit's gate / sink logit / sink tokens) are applied."""
from __future__ import annotations

import os

import pytest
import yaml

import train
from tests.hf_models import save_tiny


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ["WANDB_MODE"] = "disabled"
    root = tmp_path_factory.mktemp("init_overrides")
    (root / "corpus").mkdir()
    for d in range(4):
        text = " ".join(["the quick brown fox jumps over a lazy dog"] * 60)
        (root / "corpus" / f"doc{d}.txt").write_text(text + "\n")
    return root, save_tiny("llama", root / "llama")  # 2 layers, 4 heads, rope_theta 500 (linear x2), context 64


def run(root, folder, name, *extra, steps=1):
    return train.main([f"train.init_from=hf:{folder}", f"data.source={root / 'corpus'}",
                       f"data.cache_dir={root / 'cache'}", f"out_dir={root / 'out'}", f"name={name}",
                       "model.block_size=16", "train.batch_size=2", "train.micro_batch_size=2",
                       f"train.max_steps={steps}", "train.warmup_steps=1",
                       "train.eval_windows=2", "train.sink_interval=0", "logging.progress=false", *extra])


@pytest.mark.parametrize("override, says", [
    ("model.n_layer=4", "model.n_layer=4 (the import has 2)"),
    ("model.attention=sigmoid", "model.attention='sigmoid' (the import has 'softmax')"),
    ("model.qk_norm=true", "model.qk_norm=True (the import has False)"),
    ("model.rope_theta=10000.0", "model.rope_theta=10000.0 (the import has 500.0)"),
    ("model.block_size=128", "past the import's context of 64 tokens"),
])
def test_a_fresh_run_refuses_a_setting_the_import_fixes(setup, override, says, capsys):
    root, folder = setup
    assert run(root, folder, "fresh", override) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert not (root / "out" / "fresh").exists()


def test_settings_the_import_takes_are_applied_and_equal_ones_accepted(setup):
    root, folder = setup
    assert run(root, folder, "applied", "model.gate=headwise", "model.n_layer=2", "model.backend=math") == 0
    saved = yaml.safe_load((root / "out" / "applied" / "config.yaml").read_text())["model"]
    assert (saved["gate"], saved["n_layer"], saved["backend"], saved["block_size"]) == ("headwise", 2, "math", 16)


@pytest.mark.parametrize("override, says", [
    ("model.n_layer=4", "model.n_layer: 2 -> 4"), ("model.gate=elementwise", "model.gate: 'none' -> 'elementwise'"),
    ("model.rope_theta=10000.0", "model.rope_theta: 500.0 -> 10000.0"),
])
def test_a_resume_refuses_a_changed_setting(setup, override, says, capsys):
    root, folder = setup
    name = "base_" + override.split("=")[0].split(".")[1]
    assert run(root, folder, name) == 0
    ckpts = sorted(p.name for p in (root / "out" / name / "checkpoints").iterdir())
    capsys.readouterr()
    # By name (the run's own config.yaml plus the override) and with the full command line again.
    assert train.main([f"out_dir={root / 'out'}", f"name={name}", "train.max_steps=2", override]) == 2
    assert run(root, folder, name, override, steps=2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(says in line and "cannot resume" in line for line in err), err
    assert sorted(p.name for p in (root / "out" / name / "checkpoints").iterdir()) == ckpts
    # The kernel may change on resume, as for a plain run.
    assert train.main([f"out_dir={root / 'out'}", f"name={name}", "train.max_steps=2", "model.backend=math"]) == 0
    assert (root / "out" / name / "checkpoints" / "step_0000002").is_dir()
