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

    python -m eval.dense --ckpt out/<run> [--lost-k K] [--n-probe-train N]
"""
from __future__ import annotations

import argparse

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

CORLOC_IOU = 0.5
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
            "box": (int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max()))}


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


# ------------------------------------------------------------------------------ linear probe
def _pixel_logits(linear, feats: torch.Tensor, size: int) -> torch.Tensor:
    B, N, _ = feats.shape
    grid = int(round(N**0.5))
    logits = linear(feats).transpose(1, 2).reshape(B, 2, grid, grid)
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def linear_probe(train_feats, train_masks, val_feats, val_masks, steps: int = PROBE_STEPS) -> dict:
    """Object/background linear probe on frozen patch features (B, N, C); masks (B, H, W), 0 = background."""
    mean, std = train_feats.mean((0, 1)), train_feats.std((0, 1)).clamp_min(1e-6)
    tr, va = (train_feats - mean) / std, (val_feats - mean) / std
    size = train_masks.shape[-1]
    target = (train_masks > 0).long()
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
    truth = val_masks > 0
    iou = {}
    for name, cls in (("background", False), ("object", True)):
        p, t = pred.bool() == cls, truth == cls
        iou[name] = float((p & t).sum()) / max(float((p | t).sum()), 1.0)
    return {"miou": (iou["object"] + iou["background"]) / 2, "iou_object": iou["object"],
            "iou_background": iou["background"], "train_loss": loss.item(), "n_train": len(train_feats),
            "n_val": len(val_feats)}


# ------------------------------------------------------------------------------ both on a model
DEFINITIONS = {
    "corloc": "share of held-out images whose LOST box (last-block patch keys) has IoU >= 0.5 with some object's box",
    "mask_iou": "pixel IoU of the LOST mask with the object it overlaps most, mean over held-out images",
    "corloc_ceiling": "CorLoc of the box of the patches each object touches (the best a patch-level box can do)",
    "seed_on_object": "share of images whose LOST seed patch holds object pixels",
    "miou": "linear probe on the frozen final patch tokens, object/background, mean of the two IoUs, held-out pixels",
}


def dense_readouts(model, train_x, train_masks, val_x, val_masks, lost_k: int | None = None,
                   batch_size: int = 128) -> dict:
    """LOST on the held-out images and the linear probe (trained on train_x, scored on val_x);
    images are normalised (N, C, H, W), masks (N, H, W) instance ids, 0 = background."""
    patch = model.config.patch_size
    val = patch_features(model, val_x, batch_size)
    train = patch_features(model, train_x, batch_size)
    return {"lost": lost_scores(val["keys"], val_masks, patch, lost_k),
            "probe": linear_probe(train["tokens"], train_masks, val["tokens"], val_masks),
            "definitions": DEFINITIONS}


def dense_readouts_on_features(train_feats, train_masks, val_feats, val_masks, patch: int,
                               lost_k: int | None = None) -> dict:
    """The same readouts on given patch features (B, N, C), e.g. a denoiser's output: LOST then runs on
    the features themselves (there are no keys after a denoiser)."""
    return {"lost": lost_scores(val_feats.cpu(), val_masks, patch, lost_k),
            "probe": linear_probe(train_feats.cpu(), train_masks, val_feats.cpu(), val_masks),
            "lost_on": "features", "definitions": DEFINITIONS}


def main(argv=None) -> dict:
    from . import HelpFormatter, fail, write_json
    from .cli import checkpoint_info
    from .result import CHECKPOINT_DEFINITION
    from .vit_images import add_image_args, load_for_vit_eval

    ap = argparse.ArgumentParser(prog="python -m eval.dense", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    add_image_args(ap)
    ap.add_argument("--denoiser", default=None, help="a folder written by python -m eval.vit_denoise: score the "
                    "denoised features (LOST then runs on the features, as a denoiser has no keys)")
    args = ap.parse_args(argv)
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
            from .vit_denoise import load_denoiser, patch_tokens

            den = load_denoiser(args.denoiser).to(val_x.device)
            with torch.no_grad():
                feats = [den(patch_tokens(ctx.model, x, args.batch_size)) for x in (train_x, val_x)]
            result = dense_readouts_on_features(feats[0], train_m, feats[1], val_m, ctx.model.config.patch_size,
                                                args.lost_k)
            result["denoiser"] = args.denoiser
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))  # one line, exit code 2, as every eval
    run, out = ctx.run, ctx.out
    result["checkpoint"] = checkpoint_info(run)
    result["definitions"]["checkpoint"] = CHECKPOINT_DEFINITION
    write_json(out / ("dense_denoised.json" if args.denoiser else "dense.json"), result)
    lo, pr = result["lost"], result["probe"]
    print(f"LOST: CorLoc {100 * lo['corloc']:.1f}% (grid ceiling {100 * lo['corloc_ceiling']:.1f}%), mask IoU "
          f"{lo['mask_iou']:.3f}, seed on an object {100 * lo['seed_on_object']:.1f}% | linear probe mIoU "
          f"{pr['miou']:.3f} (object {pr['iou_object']:.3f}) on {lo['n_images']} held-out images")
    print(f"-> {out / ('dense_denoised.json' if args.denoiser else 'dense.json')}")
    return result


if __name__ == "__main__":
    main()
