"""Dense readouts (eval/dense.py): LOST and the linear patch probe on hand-built feature maps whose
answer is known, the features they read from a ViT, and the CLI on a tiny shapes run."""
from __future__ import annotations

import json
import os

import pytest
import torch

from eval import dense

os.environ.setdefault("WANDB_MODE", "disabled")
GRID, PATCH = 8, 4


def block_mask(*blocks) -> torch.Tensor:
    """(GRID*PATCH, GRID*PATCH) instance mask with object k+1 covering patch rows/cols blocks[k]."""
    m = torch.zeros(GRID * PATCH, GRID * PATCH, dtype=torch.long)
    for k, (r0, r1, c0, c1) in enumerate(blocks):
        m[r0 * PATCH : (r1 + 1) * PATCH, c0 * PATCH : (c1 + 1) * PATCH] = k + 1
    return m


def keys_for(mask: torch.Tensor, gen: torch.Generator, dim: int = 6) -> torch.Tensor:
    """Keys: region r (0 = background, k = object k) along e_r - (sum of the other regions' e)/2, plus
    small noise: patches of one region correlate positively, of two regions negatively."""
    per_patch = mask.view(GRID, PATCH, GRID, PATCH)[:, 0, :, 0].flatten()  # patch-aligned objects
    regions = int(mask.max()) + 1
    keys = 0.01 * torch.randn(GRID * GRID, dim, generator=gen)
    for i, r in enumerate(per_patch.tolist()):
        keys[i, :regions] -= 0.5
        keys[i, r] += 1.5
    return keys


def test_lost_finds_the_smallest_object_exactly():
    gen = torch.Generator().manual_seed(0)
    mask = block_mask((2, 3, 5, 6), (4, 6, 0, 2))  # a 2x2-patch object and a 3x3 one
    keys = keys_for(mask, gen)
    out = dense.lost(keys, GRID, k=8)
    want = torch.zeros(GRID, GRID, dtype=torch.bool)
    want[2:4, 5:7] = True
    assert out["seed"] in {2 * 8 + 5, 2 * 8 + 6, 3 * 8 + 5, 3 * 8 + 6}  # fewest positive correlations: 3
    assert sorted(out["similars"]) == [21, 22, 29, 30]
    assert torch.equal(out["mask"], want) and out["box"] == (2, 5, 3, 6)
    s = dense.lost_scores(keys[None], mask[None], PATCH, k=8)
    assert s["corloc"] == 1.0 and s["mask_iou"] == 1.0 and s["seed_on_object"] == 1.0 and s["corloc_ceiling"] == 1.0


def test_a_planted_background_artifact_takes_the_lost_seed():
    """The failure the papers report: a background token that correlates with nothing is LOST's seed."""
    gen = torch.Generator().manual_seed(1)
    mask = block_mask((2, 3, 5, 6))
    keys = keys_for(mask, gen)
    keys[63] = -10 * (keys[0] + keys[2 * 8 + 5])  # negative with background and object alike
    out = dense.lost(keys, GRID, k=8)
    assert out["seed"] == 63
    s = dense.lost_scores(keys[None], mask[None], PATCH, k=8)
    assert s["corloc"] == 0.0 and s["seed_on_object"] == 0.0 and s["mask_iou"] == 0.0


def test_box_iou_and_patch_ceiling():
    assert dense.box_iou((0, 0, 3, 3), (0, 0, 3, 3)) == 1.0
    assert dense.box_iou((0, 0, 3, 3), (2, 0, 5, 3)) == pytest.approx(8 / 24)
    assert dense.box_iou((0, 0, 1, 1), (5, 5, 6, 6)) == 0.0
    obj = torch.zeros(32, 32, dtype=torch.bool)
    obj[3:10, 3:10] = True  # 7x7 pixels over rows/cols 3..9: patches 0..2
    assert dense.patch_aligned_box(obj, 4) == (0, 0, 11, 11)


def test_probe_reads_object_patches_and_nothing_from_noise():
    gen = torch.Generator().manual_seed(2)
    masks = []
    for i in range(24):
        r, c = divmod(i * 5 % 36, 6)
        masks.append(block_mask((r, r + 1, c, c + 2)))
    masks = torch.stack(masks)
    per_patch = masks.view(24, GRID, PATCH, GRID, PATCH)[:, :, 0, :, 0].flatten(1)  # (B, 64)
    feats = torch.randn(24, 64, 4, generator=gen)
    feats[..., 0] = torch.where(per_patch > 0, 2.0, -2.0) + 0.1 * feats[..., 0]
    good = dense.linear_probe(feats[:16], masks[:16], feats[16:], masks[16:], steps=100)
    assert good["miou"] > 0.97 and good["iou_object"] > 0.95
    noise = torch.randn(24, 64, 4, generator=gen)
    bad = dense.linear_probe(noise[:16], masks[:16], noise[16:], masks[16:], steps=100)
    assert bad["miou"] < 0.6 and bad["iou_object"] < 0.2


def test_patch_features_are_the_last_blocks_keys_and_final_tokens():
    from model.vit import ViT, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=16, n_classes=3,
                    intermediate_size=24, n_registers=2, qk_norm=True)
    vit = ViT(cfg).eval()
    x = torch.randn(3, 1, 16, 16)
    got = dense.patch_features(vit, x)
    with torch.no_grad():
        h = vit(x, return_hidden=True).hidden
        last = vit.layers[-1]
        k = last.self_attn.k_proj(last.input_layernorm(h[-2]))
        k = last.self_attn.k_norm(k.view(3, -1, 2, 8)).view(3, -1, 16)
    assert torch.allclose(got["keys"], k[:, 3:], atol=1e-6)  # [CLS, 2 registers] left out
    assert torch.allclose(got["tokens"], vit.norm(h[-1][:, 3:]), atol=1e-6)


def test_dense_cli_on_a_tiny_shapes_run(tmp_path, capsys):
    import train

    args = ["--config", "configs/vit_shapes.yaml", f"out_dir={tmp_path}", "name=s", "model.n_layer=1",
            "model.n_embd=16", "model.n_head=2", "data.shapes_train=64", "data.shapes_val=16",
            "train.max_steps=2", "train.eval_interval=2", "train.ckpt_interval=2", "train.eval_windows=16",
            "train.batch_size=8", "train.micro_batch_size=8", "logging.progress=false"]
    assert train.main(args) == 0
    result = dense.main(["--ckpt", str(tmp_path / "s"), "--n-probe-train", "32"])
    saved = json.loads((tmp_path / "s" / "eval" / "dense.json").read_text())
    assert saved["lost"]["n_images"] == 16 and saved["probe"]["n_train"] == 32
    assert 0 <= saved["lost"]["corloc"] <= saved["lost"]["corloc_ceiling"] <= 1
    assert saved["checkpoint"]["step"] == 2 and result.probe["miou"] == saved["probe"]["miou"]
    assert "CorLoc" in capsys.readouterr().out
    # vit_artifacts reports the same readouts beside its norms, and with the test-time register
    from eval import vit_artifacts

    (art,) = vit_artifacts.main(["--ckpt", str(tmp_path / "s"), "--n-probe-train", "32", "--test-time-register",
                              "--ttr-top-k", "2"])
    assert art.dense.lost == saved["lost"] and art.dense.probe["miou"] == saved["probe"]["miou"]
    assert art.test_time_register["dense_with"].lost["n_images"] == 16
    assert 0 < art.background_share_of_patches < 1 and "high_norm_fraction" in art.layers[0]


def test_dense_readouts_refuse_images_without_masks(tmp_path, capsys):
    from fixes.vit_distill_registers import save_vit_run
    from model.vit import ViT, ViTConfig

    vit = ViT(ViTConfig(image_size=8, patch_size=2, in_channels=1, n_layer=1, n_head=2, n_embd=16, n_classes=10))
    save_vit_run(vit, tmp_path / "digits", {"task": "vit", "data": {"source": "digits"}}, 0)
    with pytest.raises(SystemExit) as e:
        dense.main(["--ckpt", str(tmp_path / "digits")])
    assert e.value.code == 2 and "has no object masks" in capsys.readouterr().err
