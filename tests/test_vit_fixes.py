"""The post-hoc ViT fixes: Denoising ViTs (fixes/vit_denoise.py) and self-distilled registers
(fixes/vit_distill_registers.py), on planted artifacts whose removal can be measured, and their CLIs
on a tiny shapes ViT and an hf: import."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from fixes import vit_denoise as dvt
from fixes import vit_distill_registers as phreg
from model.denoiser import Denoiser, load_denoiser, save_denoiser
from model.vit import ViT, ViTConfig

os.environ.setdefault("WANDB_MODE", "disabled")
GRID, PATCH, WIDTH = 8, 4, 16
ARTIFACT_AT = (1 * GRID + 6, 5 * GRID + 2)  # two fixed patch positions


pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------ Denoising ViTs
def smooth_images(n: int, seed: int) -> torch.Tensor:
    z = torch.randn(n, 1, 5, 5, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(z, size=(GRID * PATCH,) * 2, mode="bicubic", align_corners=False)


class PlantedFeatures:
    """A stand-in ViT: clean features = a fixed linear map of each patch's pixels (they move with the
    content), plus a large vector at two fixed patch positions of the input (the artifact)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(PATCH * PATCH, WIDTH, generator=g) / PATCH
        self.artifact = torch.zeros(GRID * GRID, WIDTH)
        for p in ARTIFACT_AT:
            v = torch.randn(WIDTH, generator=g)
            self.artifact[p] = 10 * v / v.norm()

    def clean(self, x):
        return F.unfold(x, PATCH, stride=PATCH).transpose(1, 2) @ self.proj

    def __call__(self, x):
        return self.clean(x) + self.artifact


def test_denoiser_removes_a_planted_position_artifact():
    feats = PlantedFeatures()
    train = smooth_images(8, 1)
    fit = dvt.decompose(feats, train, GRID, dvt.FitConfig(n_views=8, steps=150, lr=0.2, field_scale=1))
    true = feats.clean(train)
    at = list(ARTIFACT_AT)
    # stage 1: the clean part no longer holds the artifact, the shared map does
    assert (fit["clean"] - true)[:, at].norm(dim=-1).mean() < 0.4 * (fit["raw"] - true)[:, at].norm(dim=-1).mean()
    g_norm = fit["artifact"].norm(dim=-1).mean(0)
    others = [i for i in range(GRID * GRID) if i not in at]
    assert g_norm[at].min() > 3 * g_norm[others].mean()
    # stage 2: the one-block denoiser removes it from held-out images it never saw
    den, _ = dvt.train_denoiser(fit["raw"], fit["clean"], GRID, steps=150, batch_size=8, lr=3e-3)
    held = smooth_images(8, 2)
    with torch.no_grad():
        out = den(feats(held))
    true = feats.clean(held)
    raw_err = (feats(held) - true)[:, at].norm(dim=-1).mean()
    assert (out - true)[:, at].norm(dim=-1).mean() < 0.4 * raw_err
    assert F.cosine_similarity(out[:, others], true[:, others], dim=-1).mean() > 0.7


def test_denoiser_saves_and_loads(tmp_path):
    den = Denoiser(WIDTH, GRID)
    save_denoiser(den, tmp_path / "d", {"ckpt": "x"})
    x = torch.randn(2, GRID * GRID, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(load_denoiser(tmp_path / "d")(x), den.eval()(x))
    with pytest.raises(FileNotFoundError, match="denoiser.json"):
        load_denoiser(tmp_path)


# ------------------------------------------------------------------------------ self-distilled registers
def test_tta_aligns_every_view_back_to_its_patch():
    """Features that move with the content (each patch's mean pixel, flip-invariant on constant patches):
    the denoised targets equal the plain features wherever the teacher saw the patch."""
    gen = torch.Generator().manual_seed(0)
    patches = torch.randn(3, 1, GRID, GRID, generator=gen)
    images = patches.repeat_interleave(PATCH, -1).repeat_interleave(PATCH, -2)  # constant patches

    def per_patch_mean(x):
        return F.avg_pool2d(x, PATCH).flatten(2).transpose(1, 2)  # (B, N, 1)

    target = phreg.denoised_targets(per_patch_mean, images, GRID, PATCH, counts=10, shift_frac=0.25, fill=100.0,
                                    generator=gen)
    torch.testing.assert_close(target, per_patch_mean(images))
    offsets = phreg.farthest_point_offsets(GRID, 10, 0.25, gen)
    assert offsets[0].tolist() == [0, 0] and offsets.abs().max() <= 2 and len({tuple(o) for o in offsets.tolist()}) > 5


def planted_vit(seed: int = 0) -> tuple[ViT, int]:
    """A tiny random ViT whose position embedding plants a high-norm token at one patch."""
    torch.manual_seed(seed)
    vit = ViT(ViTConfig(image_size=16, patch_size=2, in_channels=1, n_layer=2, n_head=2, n_embd=32, n_classes=3,
                        init_std=0.1)).eval()
    where = 2 * 8 + 5
    with torch.no_grad():
        vit.pos_embed[0, 1 + where] += 3.0 * torch.randn(32)
    return vit, where


def artifact_ratio(vit, x, where):
    with torch.no_grad():
        h = vit(x, return_hidden=True).hidden[-1][:, vit.patch_start : vit.patch_start + vit.config.n_patches]
    n = h.norm(dim=-1)
    return float(n[:, where].mean() / n.median())


def test_self_distillation_lowers_a_planted_artifact_norm():
    teacher, where = planted_vit()
    x = torch.randn(48, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    student = phreg.make_student(teacher, 2)
    assert student.config.n_registers == 2
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = artifact_ratio(teacher, x, where)
    assert before > 5
    trainable = phreg.trainable_parameters(student)
    assert {id(p) for p in trainable} >= {id(student.registers), id(student.pos_embed)}
    assert not any(p.requires_grad for p in student.layers[0].parameters())
    phreg.distill(teacher, student, x, steps=30, batch_size=12, lr=1e-2, end_lr=1e-3, counts=6)
    assert artifact_ratio(student, x, where) < 0.7 * before
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())  # the teacher is never updated


def test_unknown_trainable_part_is_named():
    student = phreg.make_student(planted_vit()[0], 1)
    with pytest.raises(ValueError, match="unknown parts \\['mlp'\\]"):
        phreg.trainable_parameters(student, ("registers", "mlp"))


# ------------------------------------------------------------------------------ CLIs
def test_cli_denoise_and_distill_write_what_the_readouts_score(shapes_run, tmp_path, monkeypatch, capsys):
    from eval import dense
    from runs.load import load_run

    monkeypatch.chdir(tmp_path)
    r = dvt.main(["--ckpt", str(shapes_run), "--n-fit", "8", "--views", "4", "--fit-steps", "6", "--fit-batch", "8",
                  "--denoiser-steps", "4", "--n-probe-train", "8"])
    assert 0 <= r["denoised"]["outlier_fraction"] <= 1 and r["params_added"] > 0
    assert set(r["latency_ms_per_image"]) == {"vit", "vit_plus_denoiser"} and "dense_denoised" in r
    assert (shapes_run / "eval" / "vit_denoise.json").is_file()
    d = dense.main(["--ckpt", str(shapes_run), "--denoiser", r["denoiser"], "--n-probe-train", "8"])
    assert d.lost_on == "features" and 0 <= d.probe["miou"] <= 1

    s = phreg.main(["--ckpt", str(shapes_run), "--steps", "2", "--train-batch", "4", "--counts", "3",
                    "--n-registers", "2", "--n-probe-train", "8", "--name", "tiny_phreg"])
    student = load_run(tmp_path / "out" / "tiny_phreg", task="vit")
    assert student.model.config.n_registers == 2 and student.config["distilled_from"] == str(shapes_run)
    assert s["student_eval"]["dense"] is not None and s["trained_parameters"] > 0
    assert json.loads((shapes_run / "eval" / "vit_distill_registers.json").read_text())["student"] == s["student"]


def test_vit_evals_take_an_hf_import_with_data(tmp_path, monkeypatch, capsys):
    from test_hf_vit import save_tiny_vit

    from eval import vit_artifacts

    monkeypatch.chdir(tmp_path)
    save_tiny_vit("dinov2_registers", tmp_path / "d2r")
    [r] = vit_artifacts.main(["--ckpt", f"hf:{tmp_path / 'd2r'}", "--data", "digits", "--image-size", "14",
                              "--n-images", "16"])
    assert r.accuracy is None and len(r.layers) == 2 and r.model["n_registers"] == 3
    assert "n/a" in capsys.readouterr().out
    assert len(list((tmp_path / "out" / "hf").glob("d2r-*/eval/vit_artifacts.json"))) == 1
    with pytest.raises(SystemExit):
        vit_artifacts.main(["--ckpt", f"hf:{tmp_path / 'd2r'}"])
    assert "--data" in capsys.readouterr().err


def test_cli_bad_input_is_one_line_before_any_work(shapes_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for main, argv, says in [
        (dvt.main, ["--ckpt", str(tmp_path / "nowhere")], "nowhere"),
        (phreg.main, ["--ckpt", str(shapes_run), "--train", "registers,mlp"], "unknown parts ['mlp']"),
        (dvt.main, ["--ckpt", str(shapes_run), "--image-size", "64"], "image_size applies to hf: imports"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and says in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # no student written
