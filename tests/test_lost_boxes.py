"""LOST on real image sets with boxes (data/boxes.py, eval/dense.py, eval/vit_row.py): the VOC and
COCO readers, the fit to the model's input, LOST's box and CorLoc against hand computations on a
tiny VOC folder of mixed sizes and modes, and the CLIs on a tiny DINOv2 against an independent
LOST on transformers' own keys."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.boxes import read_coco, read_voc
from eval import dense

pytestmark = pytest.mark.usefixtures("single_thread")


def write_voc(root, images: dict, split: dict | None = None):
    """A Pascal VOC folder: images {id: (PIL image, file name, [(xmin, ymin, xmax, ymax, difficult)])}."""
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, (im, fname, boxes) in images.items():
        im.save(root / "JPEGImages" / fname)
        objs = "".join(f"<object><name>thing</name><difficult>{d}</difficult><truncated>0</truncated><bndbox>"
                       f"<xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{e}</ymax></bndbox></object>"
                       for a, b, c, e, d in boxes)
        (root / "Annotations" / f"{i}.xml").write_text(
            f"<annotation><filename>{fname}</filename><size><width>{im.width}</width><height>{im.height}</height>"
            f"</size>{objs}</annotation>")
    for name, ids in (split or {}).items():
        (root / "ImageSets/Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def rgb(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def voc(tmp_path):
    """Three images of three sizes and modes (RGB PNG, greyscale JPEG, RGBA PNG), one box each but two on
    the second (one difficult); the split lists two of them."""
    return write_voc(tmp_path / "voc", {
        "a": (rgb(100, 60), "a.png", [(26, 13, 62, 38, 0)]),
        "b": (rgb(40, 80, 1).convert("L"), "b.jpg", [(1, 1, 40, 80, 0), (5, 5, 10, 10, 1)]),
        "c": (rgb(30, 30, 2).convert("RGBA"), "c.png", [(1, 1, 10, 10, 0)]),
    }, {"trainval": ["a", "b"], "test": ["c"]})


def test_voc_boxes_are_read_as_lost_reads_them(voc):
    items = read_voc(voc)  # trainval by default
    assert [b.name for b in items] == ["a", "b"]
    np.testing.assert_array_equal(items[0].boxes, [[25, 12, 62, 38]])  # 1-based inclusive -> continuous
    np.testing.assert_array_equal(items[1].boxes, [[0, 0, 40, 80], [4, 4, 10, 10]])  # difficult kept
    assert len(read_voc(voc, no_hard=True)[1].boxes) == 1
    assert [b.name for b in read_voc(voc, "test")] == ["c"]
    with pytest.raises(FileNotFoundError, match="val.txt"):
        read_voc(voc, "val")


def test_coco_boxes_drop_crowds_and_round(tmp_path):
    rgb(20, 10).save(tmp_path / "x.png")
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "x.png"}],
        "annotations": [{"image_id": 7, "bbox": [1.4, 2.6, 5.0, 3.2], "iscrowd": 0},
                        {"image_id": 7, "bbox": [0, 0, 20, 10], "iscrowd": 1}]}))
    (item,) = read_coco(tmp_path / "ann.json")
    np.testing.assert_array_equal(item.boxes, [[1, 3, 6, 6]])  # round(1.4), round(2.6), round(6.4), round(5.8)
    assert item.path == tmp_path / "x.png"


def test_fit_pads_right_and_below_with_normalised_zeros():
    img = np.full((60, 100, 3), 255, dtype=np.uint8)
    x, scale, extent = dense.fit_image(img, 32, [0.5] * 3, [0.25] * 3, "pad")
    assert extent == (32, 19) and scale == (0.32, 19 / 60)
    assert torch.allclose(x[:, :19], torch.full((3, 19, 32), 2.0))  # (1 - 0.5) / 0.25
    assert torch.equal(x[:, 19:], torch.zeros(3, 13, 32))
    x, scale, extent = dense.fit_image(img, 32, [0.5] * 3, [0.25] * 3, "resize")
    assert extent == (32, 32) and scale == (0.32, 32 / 60)


def test_bbox_iou_by_hand():
    iou = dense.bbox_iou((0, 0, 10, 10), np.array([[5, 5, 15, 15], [20, 20, 30, 30], [0, 0, 10, 10]]))
    np.testing.assert_allclose(iou, [25 / 175, 0.0, 1.0], rtol=1e-6)


def planted_keys(rows, cols, grid=8, dim=4):
    """Keys where the patches of rows x cols form the object: LOST's box is exactly that block."""
    keys = torch.zeros(grid * grid, dim)
    keys[:, 0], keys[:, 1] = 1.0, -0.3
    for r in rows:
        for c in cols:
            keys[r * grid + c] = torch.tensor([-0.3, 1.0, 0.0, 0.0])
    return keys + 0.001 * torch.randn(grid * grid, dim, generator=torch.Generator().manual_seed(0))


def test_corloc_on_a_voc_folder_matches_a_hand_computation(voc):
    items = read_voc(voc)  # a: 100 x 60 RGB, b: 40 x 80 greyscale
    fits = [dense.fit_image(np.zeros((60, 100, 3), np.uint8), 32, 0, 1),
            dense.fit_image(np.zeros((80, 40, 1), np.uint8), 32, 0, 1)]
    # image a: object planted at patch rows 1-2, cols 2-4 (patch 4); image b: at rows 0-1, cols 0-1
    keys = torch.stack([planted_keys([1, 2], [2, 3, 4]), planted_keys([0, 1], [0, 1])])
    out = dense.lost_on_batch(keys, items, [f[1] for f in fits], [f[2] for f in fits], patch=4, k=100)
    # a by hand: scale 32/100 = 0.32 in x, 19/60 in y; model box x 8..20, y 4..12 -> image x 25..62.5,
    # y 12.63..37.89; ground truth (25, 12, 62, 38): IoU = 37 * 25.26 / (37.5 * 25.26 + 37 * 26 - 37 * 25.26)
    sy = 19 / 60
    pred = (8 / 0.32, 4 / sy, 20 / 0.32, 12 / sy)
    assert out[0]["box"] == [round(v, 1) for v in pred]
    inter = (62 - 25) * (12 / sy - 4 / sy)
    want = inter / ((20 / 0.32 - 8 / 0.32) * (12 / sy - 4 / sy) + 37 * 26 - inter)
    assert out[0]["best_iou"] == pytest.approx(want, rel=1e-5) and out[0]["hit"]
    assert out[0]["positive_share"] == (6 * 6 + 58 * 58) / 64**2  # object-object and background-background pairs
    # b: scale 16/40 = 0.4 in x, 32/80 in y; model box 0..8 x 0..8 -> image 0..20 x 0..20: IoU with the
    # whole image (0, 0, 40, 80) is 400 / 3200, with the difficult (4, 4, 10, 10) 36 / 400: a miss
    assert out[1]["box"] == [0.0, 0.0, 20.0, 20.0]
    assert out[1]["best_iou"] == pytest.approx(400 / 3200, rel=1e-5) and not out[1]["hit"]
    s = dense.corloc_summary(out, 100)
    assert s["corloc"] == 0.5 and s["hits"] == 1 and s["n_images"] == 2


# ------------------------------------------------------------------------------ the CLIs on a tiny DINOv2
def tiny_dinov2(folder, registers: int = 0):
    import transformers

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=32, mlp_ratio=2)
    if registers:
        cfg = transformers.Dinov2WithRegistersConfig(**kw, num_register_tokens=registers)
        model = transformers.Dinov2WithRegistersModel(cfg)
    else:
        model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.3 * torch.randn_like(p))
    model.eval().save_pretrained(folder)
    return model


def reference_lost_box(keys: torch.Tensor, grid: int, k: int = 100):
    """valeoai/LOST's lost + detect_box (object_discovery.py) on (N, D) keys: (xmin, ymin, xmax, ymax) in patches,
    max exclusive."""
    import scipy.ndimage

    A = keys @ keys.T
    B = A.clone()
    B.fill_diagonal_(0)
    B[B < 0] = 0
    order = torch.argsort(-(B > 0).sum(1).float(), descending=True, stable=True)
    seed = order[0]
    potentials = order[:k]
    similars = potentials[A[seed, potentials] > 0.0]
    M = A[similars].sum(0).reshape(grid, grid)
    labeled, _ = scipy.ndimage.label(M.numpy() > 0.0)
    ys, xs = np.where(labeled == labeled[np.unravel_index(int(seed), (grid, grid))])
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_dense_cli_on_a_voc_folder_matches_lost_on_transformers_keys(tmp_path, voc, capsys):
    hf = tiny_dinov2(tmp_path / "dino")
    result = dense.main(["--ckpt", f"hf:{tmp_path / 'dino'}", "--data", str(voc), "--batch-size", "1"])
    assert "CorLoc" in capsys.readouterr().out
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for item, got in zip(read_voc(voc), result.lost["per_image"]):
        from data.image_folder import read_image

        x, scale, extent = dense.fit_image(read_image(item.path), 32, mean, std, "pad")
        keys = []
        key_proj = next(m for n, m in hf.encoder.layer[-1].named_modules() if n.endswith(("k_proj", "attention.key")))
        hook = key_proj.register_forward_hook(lambda m, a, o: keys.append(o))
        with torch.no_grad():
            hf(pixel_values=x[None])
        hook.remove()
        x0, y0, x1, y1 = reference_lost_box(keys[0][0, 1:].double(), 8)
        box = (x0 * 4 / scale[0], y0 * 4 / scale[1], min(x1 * 4, extent[0]) / scale[0], min(y1 * 4, extent[1]) / scale[1])
        assert got["box"] == [round(v, 1) for v in box], item.name
        assert got["hit"] == bool((dense.bbox_iou(box, item.boxes) >= 0.5).any())
    assert result.lost["corloc"] == sum(p["hit"] for p in result.lost["per_image"]) / 2


def test_vit_row_with_registers_and_a_forced_search(tmp_path, voc, capsys, monkeypatch):
    from eval import vit_row

    monkeypatch.chdir(tmp_path)  # the hf: import's results go to ./out/hf/

    tiny_dinov2(tmp_path / "dino_reg", registers=2)
    r = vit_row.main(["--ckpt", f"hf:{tmp_path / 'dino_reg'}", "--data", str(voc), "--threshold", "0",
                      "--top-k", "3", "--batch-size", "1", "--n-norm-images", "1"])
    assert r.n_norm_images == 1 and r.n_images == 2
    out = capsys.readouterr().out
    assert set(r.variants) == {"as_is", "test_time_register", "without_registers"}
    assert len(r.ttr["neurons"]) == 3 and r.ttr["images_with_outliers"] == 2  # threshold 0: every token
    for v in r.variants.values():
        assert len(v["high_norm_share"]) == 2 and v["above_threshold_share"] == [1.0, 1.0]
        assert 0.0 <= v["corloc"] <= 1.0 and v["ms_per_image"] > 0
    assert "- its registers" in out and "latency added" in out
    saved = json.loads(Path(out.strip().splitlines()[-1].removeprefix("-> ")).read_text())
    assert saved["variants"] == json.loads(json.dumps(r.variants)) and saved["data"] == str(voc)
    assert set(saved["definitions"]) == {"row", "checkpoint"} and saved["checkpoint"]["format"] == "transformers"


def test_without_registers_is_the_model_without_them(tmp_path):
    from eval.vit_row import without_registers
    from runs.load import load_run

    tiny_dinov2(tmp_path / "d", registers=2)
    model = load_run(f"hf:{tmp_path / 'd'}", task="vit").model
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), without_registers(model):
        out = model(x, return_hidden=True)
        ref = model.layers[0](torch.cat((model.cls_token, model.patch_embed(x).flatten(2).transpose(1, 2)), 1)
                              + model.position_embedding())[0]
    assert out.hidden[0].shape[1] == 1 + 64 and torch.allclose(out.hidden[0], ref, atol=1e-6)
    assert model.config.n_registers == 2 and model.registers is not None  # restored


def test_register_neuron_scores_add_up_over_batches():
    from eval.vit_artifacts import find_register_neurons_reference, register_neuron_scores, top_register_neurons

    g = torch.Generator().manual_seed(0)
    acts = [torch.randn(6, 5, 7, generator=g) for _ in range(3)]
    hidden = [torch.randn(6, 5, 4, generator=g) * 2 for _ in range(3)]
    want = find_register_neurons_reference(acts, hidden, 3.0, 4, detect_layer=-2, max_layer=2)
    total, used = None, 0
    for sl in (slice(0, 2), slice(2, 6)):
        s, n = register_neuron_scores([a[sl] for a in acts], hidden[1][sl], 3.0)
        total, used = (s if total is None else total + s), used + n
    got = top_register_neurons(total, used, 2, 4)
    assert [(n["layer"], n["unit"]) for n in got] == [(n["layer"], n["unit"]) for n in want]
    assert torch.allclose(torch.tensor([n["score"] for n in got]), torch.tensor([n["score"] for n in want]))


def test_a_voc_folder_that_is_not_one_is_one_line(tmp_path, capsys):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "Annotations").mkdir()
    with pytest.raises(SystemExit) as e:
        dense.main(["--ckpt", "hf:/nonexistent", "--data", str(tmp_path)])
    assert e.value.code == 2 and "holds no images" in capsys.readouterr().err


def test_probe_leaves_out_unscored_pixels():
    """Val patches all look like the object; half the pixels are void (-1): counted as background they
    would halve the object IoU."""
    g = torch.Generator().manual_seed(0)
    grid, patch = 4, 2
    train = torch.randn(8, grid * grid, 3, generator=g)
    train_masks = (train[:, :, 0] > 0).long().view(8, grid, grid).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    train_masks[:, :, :2] = -1  # unscored pixels in training too
    val = train[:1].clone()
    val[..., 0] = 3.0
    val_masks = torch.ones(1, grid * patch, grid * patch, dtype=torch.long)
    val_masks[:, :, 4:] = -1
    out = dense.linear_probe(train, train_masks, val, val_masks)
    assert out["iou_object"] == 1.0 and out["iou_background"] == 0.0


def test_dense_cli_probes_voc_instance_masks(tmp_path, capsys):
    tiny_dinov2(tmp_path / "dino")
    images = {f"i{k}": (rgb(36 + 4 * k, 32, k), f"i{k}.jpg", [(3, 3, 20, 20, 0)]) for k in range(4)}
    voc = write_voc(tmp_path / "voc", images)
    (voc / "SegmentationObject").mkdir()
    for k in range(4):
        m = np.zeros((32, 36 + 4 * k), np.uint8)
        m[2:20, 2:20], m[1, :] = 1, 255  # one object, a void line
        Image.fromarray(m, mode="L").convert("P").save(voc / "SegmentationObject" / f"i{k}.png")
    from data.boxes import read_mask

    mask = read_mask(voc / "SegmentationObject" / "i0.png")
    assert mask[5, 5] == 1 and mask[1, 30] == -1 and mask[25, 30] == 0
    r = dense.main(["--ckpt", f"hf:{tmp_path / 'dino'}", "--data", str(voc), "--n-probe-train", "8"])
    assert r.probe["n_train"] == 2 and r.probe["n_val"] == 2 and 0.0 <= r.probe["miou"] <= 1.0
    assert "linear probe mIoU" in capsys.readouterr().out
    fitted = dense.fit_mask(mask, 32, "pad")  # 36 x 32 -> 32 x 28 inside 32 x 32, the rest -1
    assert (fitted[28:] == -1).all() and fitted[5, 5] == 1


def test_an_hf_dataset_with_boxes(tmp_path, capsys):
    """The hub's object-detection layout (imagefolder + metadata.jsonl with objects.bbox), boxes in COCO's xywh."""
    folder = tmp_path / "det"
    folder.mkdir()
    rgb(40, 30).save(folder / "a.png")
    rgb(20, 50, 1).convert("L").save(folder / "b.png")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "objects": {"bbox": [[2.0, 3.0, 10.0, 5.0]], "category": [0]}}) + "\n"
        + json.dumps({"file_name": "b.png", "objects": {"bbox": [[0.0, 0.0, 20.0, 50.0]], "category": [1]}}) + "\n")
    from data.boxes import read_hf_boxes

    items = read_hf_boxes(str(folder), box_format="xywh")
    assert [i.boxes.tolist() for i in items] == [[[2, 3, 12, 8]], [[0, 0, 20, 50]]]
    assert read_hf_boxes(str(folder), box_format="xyxy")[0].boxes.tolist() == [[2, 3, 10, 5]]
    tiny_dinov2(tmp_path / "dino")
    r = dense.main(["--ckpt", f"hf:{tmp_path / 'dino'}", "--data", str(folder), "--box-format", "xywh"])
    assert r.lost["n_images"] == 2 and r.probe is None
    # b's box is the whole image: LOST's box, clipped to the image, is inside it -> IoU = its area share
    b = r.lost["per_image"][1]
    x0, y0, x1, y1 = b["box"]
    assert b["best_iou"] == pytest.approx((x1 - x0) * (y1 - y0) / 1000, rel=1e-3)


def test_box_format_with_a_voc_folder_is_refused(voc, capsys):
    with pytest.raises(SystemExit) as e:
        dense.main(["--ckpt", "hf:/nonexistent", "--data", str(voc), "--box-format", "xyxy"])
    assert e.value.code == 2 and "--box-format is for an HF dataset" in capsys.readouterr().err
