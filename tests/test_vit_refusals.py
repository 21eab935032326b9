"""ViT commands refuse bad input in one line (exit 2) before any work, and the register distillation
never writes into a run it did not create: tiny ViTs and transformers folders built here."""
from __future__ import annotations

import json
import os

import pytest

from eval import vit_artifacts
from fixes import vit_denoise as dvt
from fixes import vit_distill_registers as phreg
from model.vit import ViT, ViTConfig
from runs.load import load_run

os.environ.setdefault("WANDB_MODE", "disabled")
pytestmark = pytest.mark.usefixtures("single_thread")


def snapshot(folder) -> dict:
    """Every file and link under `folder`: its bytes, or where the link points."""
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_symlink() or p.is_file()}


def refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    # argparse prints its usage lines before its error line
    errors = [line for line in err.splitlines() if line.startswith("error:") or ": error: " in line]
    assert e.value.code == 2 and len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


def test_distill_refuses_an_existing_run_and_a_name_outside_out(shapes_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "out" / "victim"  # an LM run's layout: a step dir with its state, `latest`
    step = victim / "checkpoints" / "step_0000020"
    (step / "accelerate").mkdir(parents=True)
    (step / "accelerate" / "model.safetensors").write_bytes(b"state")
    (step / "manifest.json").write_text("{}")
    (victim / "checkpoints" / "latest").symlink_to(step.name)
    before = snapshot(victim)
    base = ["--ckpt", str(shapes_run), "--steps", "1", "--train-batch", "4", "--counts", "2", "--n-probe-train", "4"]
    err = refused(phreg.main, base + ["--name", "victim"], capsys)
    assert "already exists" in err and "victim" in err
    assert snapshot(victim) == before
    assert not (shapes_run / "eval").exists()  # refused before the teacher was loaded or anything written
    for name in ("../../escape", "..", "/tmp/abs_escape", ""):
        err = refused(phreg.main, base + ["--name", name], capsys)
        assert "leaves out/" in err
    assert not (tmp_path.parent / "escape").exists() and not (tmp_path / "escape").exists()
    # A new name is written whole, with a manifest that load_run checks.
    import shutil

    teacher = shutil.copytree(shapes_run, tmp_path / "teacher", symlinks=True)
    phreg.main([*base[:1], str(teacher), *base[2:], "--name", "fresh"])
    capsys.readouterr()
    ckpt = tmp_path / "out" / "fresh" / "checkpoints" / "step_0000001"
    assert (ckpt / "manifest.json").is_file() and load_run(tmp_path / "out" / "fresh", task="vit").checkpoint == ckpt
    assert not list((tmp_path / "out").glob(".tmp_*"))
    with pytest.raises(FileExistsError):  # the library call refuses too, leaving the run as it was
        tiny = ViT(ViTConfig(image_size=8, patch_size=4, n_layer=1, n_head=1, n_embd=8, n_classes=2))
        phreg.save_vit_run(tiny, victim, {}, 0)
    assert snapshot(victim) == before


@pytest.mark.parametrize("main, flags, says", [
    (phreg.main, ["--lr", "nan"], "--lr"), (phreg.main, ["--lr", "-1"], "--lr"),
    (phreg.main, ["--end-lr", "inf"], "--end-lr"), (phreg.main, ["--shift-frac", "nan"], "--shift-frac"),
    (phreg.main, ["--fill", "2"], "--fill"),
    (dvt.main, ["--denoiser-lr", "nan"], "--denoiser-lr"), (dvt.main, ["--max-shift", "nan"], "--max-shift"),
    (dvt.main, ["--out", "/proc/x"], "/proc/x"),
    (vit_artifacts.main, ["--threshold", "nan"], "--threshold"),
    (vit_artifacts.main, ["--fixed-threshold", "nan"], "--fixed-threshold"),
])
def test_bad_numbers_and_an_unwritable_out_are_refused_before_any_work(shapes_run, tmp_path, monkeypatch, capsys,
                                                                       main, flags, says):
    monkeypatch.chdir(tmp_path)
    err = refused(main, ["--ckpt", str(shapes_run), *flags], capsys)
    assert says in err
    assert not (tmp_path / "out").exists() and not (shapes_run / "eval").exists()


def test_a_denoise_out_that_is_a_file_is_refused(shapes_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("keep")
    assert "is a file" in refused(dvt.main, ["--ckpt", str(shapes_run), "--out", str(tmp_path / "taken" / "d")], capsys)
    assert (tmp_path / "taken").read_text() == "keep"


# ------------------------------------------------------------------------------ damaged transformers ViT folders
@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    from test_hf_vit import save_tiny_vit

    folder = tmp_path_factory.mktemp("dinov2")
    save_tiny_vit("dinov2", folder)
    return folder


def copy_with(src, dst, config=None, preprocessor=None, raw_preprocessor=None, raw_config=None):
    import shutil

    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    if preprocessor is not None:
        (dst / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    if raw_preprocessor is not None:
        (dst / "preprocessor_config.json").write_text(raw_preprocessor)
    if raw_config is not None:
        (dst / "config.json").write_text(raw_config)
    return dst


GOOD = [0.5, 0.5, 0.5]


@pytest.mark.parametrize("change, says", [
    ({"config": {"hidden_size": 48}}, "config.json disagrees with the weights"),
    ({"config": {"patch_size": 0}}, "patch_size=0"),
    ({"preprocessor": {"image_mean": GOOD, "image_std": [0.2, 0.0, 0.2]}}, "image_std"),
    ({"preprocessor": {"image_mean": GOOD, "image_std": [float("nan")] * 3}}, "image_std"),
    ({"preprocessor": {"image_mean": "grey", "image_std": GOOD}}, "image_mean"),
    ({"preprocessor": {"image_mean": [0.5, 0.5], "image_std": GOOD}}, "image_mean"),
    ({"preprocessor": {"image_mean": [None] * 3, "image_std": GOOD}}, "image_mean"),
    ({"raw_preprocessor": '{"image_mean": [0.5, 0.5'}, "not valid JSON"),
    ({"raw_config": '{"model_type": "dinov2", "hidden_size": 3'}, "config.json is damaged, not valid JSON"),
])
def test_a_damaged_vit_folder_is_one_line_naming_the_file(dinov2, tmp_path, monkeypatch, change, says, capsys):
    monkeypatch.chdir(tmp_path)
    folder = copy_with(dinov2, tmp_path / "m", **change)
    with pytest.raises(ValueError) as e:
        load_run(f"hf:{folder}", task="vit")
    msg = str(e.value)
    assert says in msg and "\n" not in msg and str(folder) in msg
    named = "preprocessor_config.json" if ("preprocessor" in change or "raw_preprocessor" in change) else "config"
    assert named in msg
    # The eval CLIs say the same in one line, exit 2.
    err = refused(vit_artifacts.main, ["--ckpt", f"hf:{folder}", "--data", "digits", "--n-images", "4"], capsys)
    assert says in err
    assert not (tmp_path / "out").exists()


def test_one_number_for_every_channel_is_still_taken(dinov2, tmp_path):
    folder = copy_with(dinov2, tmp_path / "m", preprocessor={"image_mean": 0.5, "image_std": 0.25})
    info = load_run(f"hf:{folder}", task="vit").config["hf"]
    assert (info["image_mean"], info["image_std"]) == ([0.5] * 3, [0.25] * 3)
