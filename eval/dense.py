"""Dense readouts of a ViT's patch features on images with object masks: LOST and a linear probe.

- **LOST** (Simeoni et al. 2021, unsupervised object discovery): on the last block's key features
  of the patches, A = K K^T; the seed is the patch with the fewest positive correlations (lowest
  degree); the seed's similar patches are those of the `k` lowest-degree patches with a positive
  correlation to it; the seed expansion is the patches whose summed correlation with them is
  positive, and the connected component of that map holding the seed is the mask; its bounding
  box is the box. As in valeoai/LOST: unnormalised keys (heads concatenated; after qk_norm when
  the model has it), CLS and registers left out, 4-connectivity. Scores: **CorLoc** = share of
  images whose box has IoU >= 0.5 with some object's box; **mask IoU** = the pixel IoU of the mask
  with the object it overlaps most, averaged over images. LOST's k = 100 was chosen for ~900
  patches; here the default is an eighth of the patches (8 of 64).
- **Linear probe** (DINOv2's linear segmentation protocol, two classes): a linear layer on the
  frozen patch tokens after the final norm, its logits upsampled bilinearly to pixels, trained
  with pixel cross-entropy on train images (features standardised with train statistics,
  full-batch Adam from zero init: deterministic), scored on held-out images as **mIoU** (mean of
  the object and background IoU, pixels pooled over images).

Both are reported with the oracle ceiling that the patch grid allows: CorLoc of the box of the
patches each object touches (a patch-level method cannot do better than that alignment).

**Real images with boxes** (`--data` a Pascal VOC folder, a COCO json, or an HF dataset with boxes
and `--box-format`; data/boxes.py): LOST,
scored as valeoai/LOST scores it, and the linear probe where the VOC folder has instance masks
(SegmentationObject/<id>.png: the first `--n-probe-train` of those images, at most half, train it,
the rest score it; the void border and the padding are not scored). LOST: its box is the seed's component's
patches, (x0, y0) = first patch x patch size, (x1, y1) = (last patch + 1) x patch size, clipped
to the image (LOST's padding); a hit is an IoU >= 0.5 with any ground-truth box (continuous
coordinates, LOST's `bbox_iou`); CorLoc = hits / images, images without a box counting as
misses; k = 100 (LOST's default) or the patch count when smaller. Images of any size and mode
are fitted to the model's square input: `--fit pad` (default) scales the longer side to the
input size and pads the rest with zeros after normalisation (LOST pads with zeros, at the
image's own resolution, to the next multiple of the patch size), `--fit resize` stretches. The
predicted box is mapped back to the image's pixels, where the ground truth lives.

    python -m eval.dense --ckpt out/<run> [--lost-k K] [--n-probe-train N]
    python -m eval.dense --ckpt hf:facebook/dinov2-large --data VOCdevkit/VOC2007 [--split trainval] [--fit pad]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from data.boxes import BOX_FORMATS
from model.denoiser import load_denoiser

from .result import EvalResult

CORLOC_IOU = 0.5
LOST_K = 100  # valeoai/LOST's k_patches
FITS = ("pad", "resize")
PROBE_STEPS = 300
PROBE_LR = 0.05


# ------------------------------------------------------------------------------ features
@torch.no_grad()
def patch_features(model, images: torch.Tensor, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """keys: the last block's attention keys of the patch tokens (B, N, H*D);
    tokens: the patch tokens after the final norm (B, N, C). Any intervention hooked on `model`
    (e.g. a test-time register) is in effect."""
    attn = model.layers[-1].self_attn
    start, n = model.patch_start, model.config.n_patches
    grabbed = []

    def grab(module, args, out):
        k = out
        if getattr(attn, "k_norm", None) is not None:
            B, T, _ = k.shape
            k = attn.k_norm(k.view(B, T, -1, model.config.head_dim)).view(B, T, -1)
        grabbed.append(k[:, start : start + n].float().cpu())

    tokens = []
    handle = attn.k_proj.register_forward_hook(grab)
    try:
        for x in images.split(batch_size):
            out = model(x, return_hidden=True)
            tokens.append(model.norm(out.hidden[-1][:, start : start + n]).float().cpu())
    finally:
        handle.remove()
    return {"keys": torch.cat(grabbed), "tokens": torch.cat(tokens)}


@torch.no_grad()
def patch_tokens(model, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """(B, N, C) patch tokens after the final norm: what a denoiser (model/denoiser.py) reads."""
    start, n = model.patch_start, model.config.n_patches
    out = []
    for x in images.split(batch_size):
        h = model(x, return_hidden=True).hidden[-1]
        out.append(model.norm(h[:, start : start + n]).float())
    return torch.cat(out)


# ------------------------------------------------------------------------------ LOST
def lost(keys: torch.Tensor, grid: int, k: int) -> dict:
    """LOST on one image's patch keys (N, D), N = grid*grid row-major: seed, similar patches, mask."""
    A = keys.double() @ keys.double().T
    degree = ((A > 0).sum(1) - (A.diagonal() > 0).long())  # positive correlations with other patches
    order = torch.argsort(degree, stable=True)  # lowest degree first; ties: lowest index
    seed = int(order[0])
    potentials = order[:k]
    similars = potentials[A[seed, potentials] > 0]
    expansion = A[similars].sum(0).view(grid, grid)
    labeled, _ = scipy.ndimage.label((expansion > 0).numpy())
    component = labeled == labeled.flat[seed]
    if not component.flat[seed]:  # the seed's own expansion is not positive: keep the seed alone
        component = np.zeros((grid, grid), dtype=bool)
        component.flat[seed] = True
    ys, xs = np.nonzero(component)
    return {"seed": seed, "similars": similars.tolist(), "mask": torch.from_numpy(component),
            "box": (int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())),
            "positive_share": float((A > 0).double().mean())}


def box_iou(a, b) -> float:
    """IoU of two boxes (y0, x0, y1, x1) with inclusive pixel bounds."""
    h = min(a[2], b[2]) - max(a[0], b[0]) + 1
    w = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(h, 0) * max(w, 0)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def patch_box_to_pixels(box, patch: int):
    return (box[0] * patch, box[1] * patch, (box[2] + 1) * patch - 1, (box[3] + 1) * patch - 1)


def patch_aligned_box(obj: torch.Tensor, patch: int):
    """The pixel box of the patches an object (H, W bool) touches: the best a patch-level box can be."""
    ys, xs = torch.nonzero(obj, as_tuple=True)
    return patch_box_to_pixels((int(ys.min()) // patch, int(xs.min()) // patch,
                                int(ys.max()) // patch, int(xs.max()) // patch), patch)


def object_patches(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, H, W) instance masks -> (B, grid*grid) bool, row-major: True where a patch holds object pixels."""
    B, H, W = masks.shape
    return (masks > 0).view(B, H // patch, patch, W // patch, patch).any(4).any(2).flatten(1)


def lost_scores(keys: torch.Tensor, masks: torch.Tensor, patch: int, k: int | None = None) -> dict:
    """CorLoc, mask IoU and the grid's CorLoc ceiling of LOST over images: keys (B, N, D), masks (B, H, W)."""
    from data.shapes import boxes_from_mask

    B, N, _ = keys.shape
    grid = int(round(N**0.5))
    k = max(1, N // 8) if k is None else k
    hits, ious, ceiling, seeds_on_object = 0, [], 0, 0
    on_object = object_patches(masks, patch)
    for b in range(B):
        out = lost(keys[b], grid, k)
        boxes = boxes_from_mask(masks[b])
        box = patch_box_to_pixels(out["box"], patch)
        hits += any(box_iou(box, g) >= CORLOC_IOU for g in boxes)
        ceiling += any(box_iou(patch_aligned_box(masks[b] == i + 1, patch), g) >= CORLOC_IOU
                       for i, g in enumerate(boxes))
        pred = out["mask"].repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        best = 0.0
        for i in range(len(boxes)):
            obj = masks[b] == i + 1
            best = max(best, float((pred & obj).sum()) / float((pred | obj).sum()))
        ious.append(best)
        seeds_on_object += bool(on_object[b, out["seed"]])
    return {"corloc": hits / B, "mask_iou": float(np.mean(ious)), "corloc_ceiling": ceiling / B,
            "seed_on_object": seeds_on_object / B, "k": k, "n_images": B}


# ------------------------------------------------------------------------------ LOST on images with boxes
def fit_image(img: np.ndarray, size: int, mean, std, fit: str = "pad"):
    """(H, W, C) uint8 -> ((C, size, size) normalised, (x, y) scale from image to model pixels, (w, h) of
    the image inside the model's input). pad: longer side -> size, zeros (after normalisation) right
    and below; resize: both sides -> size."""
    if fit not in FITS:
        raise ValueError(f"--fit must be one of {list(FITS)}, got {fit!r}")
    H, W = img.shape[:2]
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255.0  # a writable copy
    if fit == "pad":
        s = size / max(H, W)
        h, w = max(1, round(H * s)), max(1, round(W * s))
    else:
        h, w = size, size
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
    mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    out = torch.zeros(x.shape[0], size, size)
    out[:, :h, :w] = (x - mean) / std
    return out, (w / W, h / H), (w, h)


def lost_box_to_image(box, patch: int, scale, extent):
    """LOST's box (patch rows / cols, inclusive: y0, x0, y1, x1) -> (x0, y0, x1, y1) in the image's
    pixels: LOST's detect_box (max + 1, times the patch, clipped to the image), then unscaled."""
    y0, x0, y1, x1 = box
    x1p, y1p = min((x1 + 1) * patch, extent[0]), min((y1 + 1) * patch, extent[1])
    return (x0 * patch / scale[0], y0 * patch / scale[1], x1p / scale[0], y1p / scale[1])


def bbox_iou(box, gts: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """IoU of one (x0, y0, x1, y1) box with each row of gts (K, 4), as LOST's bbox_iou computes it."""
    gts = np.asarray(gts, dtype=np.float64).reshape(-1, 4)
    iw = (np.minimum(box[2], gts[:, 2]) - np.maximum(box[0], gts[:, 0])).clip(0)
    ih = (np.minimum(box[3], gts[:, 3]) - np.maximum(box[1], gts[:, 1])).clip(0)
    inter = iw * ih
    w1, h1 = box[2] - box[0], box[3] - box[1] + eps
    w2, h2 = gts[:, 2] - gts[:, 0], gts[:, 3] - gts[:, 1] + eps
    return inter / (w1 * h1 + w2 * h2 - inter + eps)


def box_batches(model, items, mean, std, fit: str = "pad", batch_size: int = 8):
    """Yield (items, normalised images (B, C, S, S), scales, extents) for BoxedImage `items`."""
    from data.image_folder import read_image

    c = model.config
    device = next(model.parameters()).device
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        fitted = [fit_image(read_image(b.source(), c.in_channels), c.image_size, mean, std, fit) for b in chunk]
        x = torch.stack([f[0] for f in fitted]).to(device=device, dtype=next(model.parameters()).dtype)
        yield chunk, x, [f[1] for f in fitted], [f[2] for f in fitted]


def lost_on_batch(keys, chunk, scales, extents, patch: int, k: int) -> list[dict]:
    """LOST on a batch's last-block keys (B, N, D); per image its box in image pixels and the hit."""
    grid = int(round(keys.shape[1] ** 0.5))
    out = []
    for b, item in enumerate(chunk):
        res = lost(keys[b], grid, min(k, keys.shape[1]))
        box = lost_box_to_image(res["box"], patch, scales[b], extents[b])
        ious = bbox_iou(box, item.boxes)
        out.append({"name": item.name, "box": [round(v, 1) for v in box], "n_gt": len(item.boxes),
                    "best_iou": float(ious.max()) if len(ious) else 0.0, "positive_share": res["positive_share"],
                    "hit": bool(len(ious) and (ious >= CORLOC_IOU).any())})
    return out


def corloc_summary(per_image: list[dict], k: int) -> dict:
    hits = sum(p["hit"] for p in per_image)
    # when (nearly) every pair of patch keys correlates positively, LOST's expansion is the whole image
    return {"corloc": hits / len(per_image), "hits": hits, "n_images": len(per_image), "k": k,
            "positive_share": float(np.mean([p["positive_share"] for p in per_image])),
            "n_without_boxes": sum(p["n_gt"] == 0 for p in per_image), "per_image": per_image}


def lost_on_boxed(model, items, mean, std, k: int = LOST_K, fit: str = "pad", batch_size: int = 8) -> dict:
    """LOST CorLoc over BoxedImage `items` (data/boxes.py) as valeoai/LOST computes it (module docstring)."""
    per_image = []
    for chunk, x, scales, extents in box_batches(model, items, mean, std, fit, batch_size):
        keys = patch_features(model, x, batch_size)["keys"]
        per_image += lost_on_batch(keys, chunk, scales, extents, model.config.patch_size, k)
    return corloc_summary(per_image, k)


def fit_mask(mask: np.ndarray, size: int, fit: str = "pad") -> torch.Tensor:
    """An (H, W) instance mask fitted as `fit_image` fits its image (nearest); padding = -1 (not scored)."""
    H, W = mask.shape
    m = torch.from_numpy(mask.astype(np.int64))[None, None].float()
    if fit == "pad":
        s = size / max(H, W)
        h, w = max(1, round(H * s)), max(1, round(W * s))
    else:
        h, w = size, size
    out = torch.full((size, size), -1, dtype=torch.long)
    out[:h, :w] = F.interpolate(m, size=(h, w), mode="nearest")[0, 0].long()
    return out


def probe_on_boxed(model, items, mean, std, n_train: int, fit: str = "pad", batch_size: int = 8) -> dict | None:
    """The linear probe on the items that have a segmentation mask (VOC's SegmentationObject): the first
    `n_train` (at most half) train it, the rest score it. None when fewer than two have one."""
    from data.boxes import read_mask

    masked = [b for b in items if b.mask_path is not None]
    if len(masked) < 2:
        return None
    n = min(n_train, len(masked) // 2)
    feats, masks = [], []
    for chunk, x, _, _ in box_batches(model, masked, mean, std, fit, batch_size):
        feats.append(patch_features(model, x, batch_size)["tokens"])
        masks += [fit_mask(read_mask(b.mask_path), model.config.image_size, fit) for b in chunk]
    feats, masks = torch.cat(feats), torch.stack(masks)
    return linear_probe(feats[:n], masks[:n], feats[n:], masks[n:])


def box_normalisation(run_config: dict, model, items, fit: str, n: int = 64) -> dict:
    """The model's pixel mean / std (an import's), else the channel statistics of the first `n` images."""
    from data.image_folder import read_image

    from .vit_images import model_normalisation

    norm = model_normalisation(run_config)
    if norm is not None:
        return norm
    c = model.config
    x = torch.stack([fit_image(read_image(b.source(), c.in_channels), c.image_size, 0.0, 1.0, "resize")[0]
                     for b in items[:n]])
    return {"image_mean": x.mean((0, 2, 3)).tolist(), "image_std": x.std((0, 2, 3)).clamp_min(1e-6).tolist()}


# ------------------------------------------------------------------------------ linear probe
def _pixel_logits(linear, feats: torch.Tensor, size: int) -> torch.Tensor:
    B, N, _ = feats.shape
    grid = int(round(N**0.5))
    logits = linear(feats).transpose(1, 2).reshape(B, 2, grid, grid)
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def linear_probe(train_feats, train_masks, val_feats, val_masks, steps: int = PROBE_STEPS) -> dict:
    """Object/background linear probe on frozen patch features (B, N, C); masks (B, H, W), 0 = background,
    negative = not scored (VOC's void border, padding): left out of the loss and of the IoUs."""
    mean, std = train_feats.mean((0, 1)), train_feats.std((0, 1)).clamp_min(1e-6)
    tr, va = (train_feats - mean) / std, (val_feats - mean) / std
    size = train_masks.shape[-1]
    target = (train_masks > 0).long()
    target[train_masks < 0] = -100  # cross_entropy's ignore_index
    linear = torch.nn.Linear(tr.shape[-1], 2)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.Adam(linear.parameters(), lr=PROBE_LR)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(_pixel_logits(linear, tr, size), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = _pixel_logits(linear, va, size).argmax(1)
    truth, scored = val_masks > 0, val_masks >= 0
    iou = {}
    for name, cls in (("background", False), ("object", True)):
        p, t = (pred.bool() == cls) & scored, (truth == cls) & scored
        iou[name] = float((p & t).sum()) / max(float((p | t).sum()), 1.0)
    return {"miou": (iou["object"] + iou["background"]) / 2, "iou_object": iou["object"],
            "iou_background": iou["background"], "train_loss": loss.item(), "n_train": len(train_feats),
            "n_val": len(val_feats)}


# ------------------------------------------------------------------------------ both on a model
@dataclass
class DenseResult(EvalResult):
    """LOST (lost_scores) and the linear probe (linear_probe) on held-out images with object masks."""

    lost: dict
    probe: dict

    DEFINITIONS = {
        "corloc": "share of held-out images whose LOST box (last-block patch keys) has IoU >= 0.5 with some object's "
                  "box",
        "mask_iou": "pixel IoU of the LOST mask with the object it overlaps most, mean over held-out images",
        "corloc_ceiling": "CorLoc of the box of the patches each object touches (the best a patch-level box can do)",
        "seed_on_object": "share of images whose LOST seed patch holds object pixels",
        "miou": "linear probe on the frozen final patch tokens, object/background, mean of the two IoUs, held-out "
                "pixels",
    }

    def readouts(self) -> dict:
        """The JSON without a checkpoint: what a result holding these readouts (vit_artifacts, fixes/) nests."""
        out = self.to_json()
        del out["checkpoint"], out["definitions"]["checkpoint"]
        return out


@dataclass
class DenseOnFeaturesResult(DenseResult):
    """The readouts on given patch features (a denoiser's output, or the raw ones beside it)."""

    lost_on: str = "features"  # there are no keys after a denoiser
    denoiser: str | None = None  # the denoiser's folder, set by the CLI
    OPTIONAL = ("denoiser",)


@dataclass
class DenseBoxesResult(DenseResult):
    """LOST CorLoc (corloc_summary) on images with boxes, and the linear probe where they have instance
    masks (probe None without)."""

    data: str
    split: str | None
    fit: str
    image_size: int
    patch_size: int

    DEFINITIONS = {
        "corloc": "share of images whose LOST box (last-block patch keys, valeoai/LOST's box and bbox_iou) has IoU "
                  ">= 0.5 with some ground-truth box; images without a box count as misses",
        "miou": "linear probe on the frozen final patch tokens, object (any instance of SegmentationObject) / "
                "background, mean of the two IoUs over held-out masked images; VOC's void border and the padding "
                "not scored; null without masks",
    }


def dense_readouts(model, train_x, train_masks, val_x, val_masks, lost_k: int | None = None,
                   batch_size: int = 128) -> DenseResult:
    """LOST on the held-out images and the linear probe (trained on train_x, scored on val_x);
    images are normalised (N, C, H, W), masks (N, H, W) instance ids, 0 = background."""
    patch = model.config.patch_size
    val = patch_features(model, val_x, batch_size)
    train = patch_features(model, train_x, batch_size)
    return DenseResult(lost=lost_scores(val["keys"], val_masks, patch, lost_k),
                       probe=linear_probe(train["tokens"], train_masks, val["tokens"], val_masks))


def dense_readouts_on_features(train_feats, train_masks, val_feats, val_masks, patch: int,
                               lost_k: int | None = None) -> DenseOnFeaturesResult:
    """The same readouts on given patch features (B, N, C), e.g. a denoiser's output: LOST then runs on
    the features themselves (there are no keys after a denoiser)."""
    return DenseOnFeaturesResult(lost=lost_scores(val_feats.cpu(), val_masks, patch, lost_k),
                                 probe=linear_probe(train_feats.cpu(), train_masks, val_feats.cpu(), val_masks))


def add_box_args(ap) -> None:
    """The flags of LOST on images with boxes (a VOC folder or a COCO json as --data)."""
    ap.add_argument("--split", default=None, help="VOC folder: ImageSets/Main/<split>.txt (default trainval, else "
                    "every annotation)")
    ap.add_argument("--image-root", default=None, help="COCO json: the folder of its images (default: found beside it)")
    ap.add_argument("--fit", choices=FITS, default="pad", help="how an image meets the model's square input: pad "
                    "(keep the aspect, zeros after normalisation, as LOST pads) or resize (stretch)")
    ap.add_argument("--box-format", choices=BOX_FORMATS, default=None, help="--data is an HF dataset with boxes "
                    "(an objects column with bbox lists) in this format: xywh (COCO's) or xyxy")
    ap.add_argument("--no-hard", action="store_true", help="VOC: leave out difficult / truncated objects and the "
                    "images left without any (LOST's --no_hard)")


def load_boxed_items(args) -> list:
    """The BoxedImages that --data names, capped at --n-images."""
    from data.boxes import is_boxed, read_boxed, read_hf_boxes

    if args.box_format is not None:
        if is_boxed(args.data):
            raise ValueError(f"--box-format is for an HF dataset with boxes; {args.data} is a VOC folder or a COCO "
                             "json, whose box format is fixed: leave it out")
        items = read_hf_boxes(args.data, args.split, args.box_format)
    else:
        items = read_boxed(args.data, args.split, args.image_root, args.no_hard)
    if not items:
        raise ValueError(f"{args.data} holds no images{' with boxes that are not hard' if args.no_hard else ''}")
    return items[: args.n_images] if args.n_images else items


def load_boxed_vit(args, prog: str):
    """The images with boxes that --data names and the ViT that --ckpt names: (items, run, model in eval mode)."""
    from .cli import load

    items = load_boxed_items(args)
    run = load(args.ckpt, args, task="vit")
    if run.config.get("task", "lm") != "vit":
        raise ValueError(f"{args.ckpt} is a language-model run; {prog} needs a ViT (task: vit or hf: ViT)")
    return items, run, run.model.eval()


def main_boxed(args) -> DenseBoxesResult:
    """eval.dense on a VOC folder or a COCO json: LOST CorLoc."""
    from . import fail, write_json
    from .cli import checkpoint_info, output_dir

    try:
        items, run, model = load_boxed_vit(args, "eval.dense")
        norm = box_normalisation(run.config, model, items, args.fit)
        k = args.lost_k or LOST_K
        lost = lost_on_boxed(model, items, norm["image_mean"], norm["image_std"], k, args.fit, args.batch_size)
        probe = probe_on_boxed(model, items, norm["image_mean"], norm["image_std"], args.n_probe_train, args.fit,
                               args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    out = output_dir(run, args.ckpt)
    result = DenseBoxesResult(lost=lost, probe=probe, data=str(args.data), split=args.split, fit=args.fit,
                              image_size=model.config.image_size, patch_size=model.config.patch_size,
                              checkpoint=checkpoint_info(run))
    write_json(out / "dense_boxes.json", result.to_json())
    print(f"LOST: CorLoc {100 * lost['corloc']:.1f}% ({lost['hits']}/{lost['n_images']}) on {args.data}, "
          f"{model.config.image_size}px ({model.config.grid}x{model.config.grid} patches of {model.config.patch_size}), "
          f"fit {args.fit}, k {lost['k']}; {100 * lost['positive_share']:.0f}% of patch-key pairs correlate positively")
    if probe is not None:
        print(f"linear probe mIoU {probe['miou']:.3f} (object {probe['iou_object']:.3f}), trained on {probe['n_train']} "
              f"and scored on {probe['n_val']} images with segmentation masks")
    print(f"-> {out / 'dense_boxes.json'}")
    return result


def main(argv=None) -> DenseResult:
    from data.boxes import is_boxed

    from . import HelpFormatter, fail, write_json
    from .cli import checkpoint_info
    from .vit_images import add_image_args, load_for_vit_eval

    ap = argparse.ArgumentParser(prog="python -m eval.dense", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    add_image_args(ap)
    add_box_args(ap)
    ap.add_argument("--denoiser", default=None, help="a folder written by python -m fixes.vit_denoise: score the "
                    "denoised features (LOST then runs on the features, as a denoiser has no keys)")
    args = ap.parse_args(argv)
    if is_boxed(args.data) or args.box_format is not None:
        if args.denoiser:
            fail("--denoiser scores images with masks (--data shapes); with a VOC folder or COCO json leave it out")
        return main_boxed(args)
    try:
        ctx = load_for_vit_eval(args)
        data = ctx.dense_data(args.n_probe_train)
        if data is None:
            raise ValueError(f"data.source={ctx.data_source!r} has no object masks; dense readouts need images "
                             "with masks (--data shapes)")
        train_x, train_m, val_x, val_m = data
        if args.denoiser is None:
            result = dense_readouts(ctx.model, train_x, train_m, val_x, val_m, args.lost_k, args.batch_size)
        else:
            den = load_denoiser(args.denoiser).to(val_x.device)
            with torch.no_grad():
                feats = [den(patch_tokens(ctx.model, x, args.batch_size)) for x in (train_x, val_x)]
            result = dense_readouts_on_features(feats[0], train_m, feats[1], val_m, ctx.model.config.patch_size,
                                                args.lost_k)
            result.denoiser = args.denoiser
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))  # one line, exit code 2, as every eval
    run, out = ctx.run, ctx.out
    result.checkpoint = checkpoint_info(run)
    write_json(out / ("dense_denoised.json" if args.denoiser else "dense.json"), result.to_json())
    lo, pr = result.lost, result.probe
    print(f"LOST: CorLoc {100 * lo['corloc']:.1f}% (grid ceiling {100 * lo['corloc_ceiling']:.1f}%), mask IoU "
          f"{lo['mask_iou']:.3f}, seed on an object {100 * lo['seed_on_object']:.1f}% | linear probe mIoU "
          f"{pr['miou']:.3f} (object {pr['iou_object']:.3f}) on {lo['n_images']} held-out images")
    print(f"-> {out / ('dense_denoised.json' if args.denoiser else 'dense.json')}")
    return result


if __name__ == "__main__":
    from eval import run_main  # Ctrl-C: one line, exit 130

    run_main(main)
