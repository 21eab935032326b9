"""Denoising ViTs (Yang et al. 2024, "DVT"): split a ViT's patch features into a clean semantic part
and a position-dependent artifact, then train a one-block denoiser that maps raw features to clean ones.

Stage 1, per image (`decompose`): the frozen ViT sees `n_views` augmented views of the image (random
shifts, horizontal flips; view 0 is the image itself). Its final patch features (after the last
norm) are modelled as

    F_view(p) = S(x(p)) + G(p) + h(F_view(p))

S is the image's semantic field over image coordinates x (so it agrees across views), G a map over
the view's patch grid (the same for every view, so it can only hold what depends on the position
in the input, not on the content), and h a small MLP for the image- and position-dependent
remainder. Loss: MSE + (1 - cosine) on every patch a view keeps inside the image; after half the
steps G is frozen and h switched on (trained with 0.1 MSE to the remainder + 0.02 L1). The clean
features of the image are S at its own patch centres.

Stage 2 (`train_denoiser`): one transformer block with a learned position embedding (LayerNorm,
GELU MLP, biases, heads = width / 64: DVT's timm Block) trained on (raw features, stage-1 clean
features) pairs of the train images with MSE + (1 - cosine). At test time it runs on the ViT's
features: one block over the patch tokens, its cost reported as latency and parameters.

Where this differs from their code (Jiawei-Yang/Denoising-ViT): S is a dense learnable grid at
twice the patch resolution, sampled bilinearly, instead of an instant-NGP hash-grid field; the
views are shifted and flipped copies (out-of-image pixels at the normalised mean, those patches
left out of the loss), not random resized crops of scale 0.1-0.5 (`zoom` turns crops on); S starts
at the image's own features, upsampled; all images of a batch are fitted at once, each with its own S,
G and h (`shared_artifact=True` shares G across the batch, the paper's input-independent term);
steps are hundreds, not 20,000 per image, so the learning rate is 0.1 instead of 0.01, on features
divided by their standard deviation. The optimiser and its schedule are theirs (Adam, betas
0.9/0.99, 10% linear warmup, x0.33 at 1/4, 1/2, 3/4, 9/10; stage 2 AdamW with cosine decay).

    python -m fixes.vit_denoise --ckpt out/<run> [--n-fit 256] [--fit-steps 400] [--denoiser-steps 600]
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.dense import patch_tokens
from model.denoiser import Denoiser, save_denoiser

# ------------------------------------------------------------------------------ features and views
def patch_centres(grid: int) -> torch.Tensor:
    """(grid, grid, 2) patch centres in grid_sample's (x, y) coordinates, align_corners=False."""
    c = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack((x, y), dim=-1)


def make_views(images: torch.Tensor, grid: int, n_views: int, max_shift: float, generator: torch.Generator,
               flip: bool = True, zoom: tuple[float, float] = (1.0, 1.0)):
    """Augmented views of each image: (B * V, C, H, W) views and (B, V, grid, grid, 2) the image
    coordinates of every view patch's centre. A view pixel at u samples the image at s * u' + t
    (u' = u mirrored in x when flipped): s from `zoom`, t a shift of up to `max_shift` patches
    (plus the room a zoomed crop leaves). View 0 is the image itself."""
    B = len(images)
    s = torch.empty(B, n_views).uniform_(*zoom, generator=generator)
    room = (1 - s) + 2 * max_shift / grid
    t = (torch.rand(B, n_views, 2, generator=generator) * 2 - 1) * room[..., None]
    mirror = (torch.rand(B, n_views, generator=generator) < 0.5) & flip
    s[:, 0], t[:, 0], mirror[:, 0] = 1.0, 0.0, False
    sign = torch.stack((torch.where(mirror, -1.0, 1.0), torch.ones(B, n_views)), dim=-1)  # (B, V, 2)

    def where_in_image(u):  # u (..., 2) view coordinates -> image coordinates, per (image, view)
        return s[:, :, None, None, None] * u * sign[:, :, None, None] + t[:, :, None, None]

    H, W = images.shape[-2:]
    pixel = patch_centres(H) if H == W else None
    if pixel is None:
        raise ValueError(f"views need square images, got {H}x{W}")
    grids = where_in_image(pixel)  # (B, V, H, W, 2)
    views = F.grid_sample(images.repeat_interleave(n_views, 0), grids.flatten(0, 1), mode="bilinear",
                          padding_mode="zeros", align_corners=False)
    return views, where_in_image(patch_centres(grid))


# ------------------------------------------------------------------------------ stage 1
@dataclass
class FitConfig:
    n_views: int = 16
    max_shift: float = 2.0  # patches
    flip: bool = True
    zoom: tuple[float, float] = (1.0, 1.0)
    steps: int = 400
    lr: float = 0.1  # theirs is 0.01 for 20,000 steps
    field_scale: int = 2  # S's resolution = field_scale x the patch grid
    residual: bool = True
    shared_artifact: bool = False
    seed: int = 0


def _dvt_lr_factor(step: int, total: int) -> float:
    """Their stage-1 schedule: linear warmup from 0.01 over 10% of the steps, x0.33 at 1/4, 1/2, 3/4, 9/10."""
    warm = min(1.0, 0.01 + 0.99 * step / max(1, total // 10))
    return warm * 0.33 ** sum(step >= total * f for f in (0.25, 0.5, 0.75, 0.9))


class _BatchedMLP(nn.Module):
    """h: C -> C/4 -> C/4 -> C with ReLU, one independent MLP per image (weights batched)."""

    def __init__(self, n: int, width: int):
        super().__init__()
        dims = [width, max(1, width // 4), max(1, width // 4), width]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims, dims[1:]):
            bound = 1 / math.sqrt(a)  # nn.Linear's default init
            self.weights.append(nn.Parameter(torch.empty(n, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, b).uniform_(-bound, bound)))

    def forward(self, x):  # (n, P, C)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = F.relu(x)
        return x


def bilinear_corners(coords: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where (B, P, 4) and how much (B, P, 4) each of coords (B, P, 2) reads a size x size map, as
    grid_sample does (bilinear, align_corners=False, border padding). Reading is then a gather,
    whose backward is far cheaper on the CPU than grid_sample's."""
    px = ((coords + 1) * size - 1) / 2  # in cells, x then y
    lo = px.floor()
    frac = px - lo
    index, weight = [], []
    for dx in (0, 1):
        for dy in (0, 1):
            weight.append((frac[..., 0] if dx else 1 - frac[..., 0]) * (frac[..., 1] if dy else 1 - frac[..., 1]))
            ix = (lo[..., 0] + dx).clamp(0, size - 1)
            iy = (lo[..., 1] + dy).clamp(0, size - 1)
            index.append((iy * size + ix).long())
    return torch.stack(index, -1), torch.stack(weight, -1)


def read_field(field: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """field (B, R*R, C) read at the corners of `bilinear_corners`: (B, P, C)."""
    B, P, _ = index.shape
    corners = field.gather(1, index.view(B, P * 4, 1).expand(-1, -1, field.shape[-1])).view(B, P, 4, -1)
    return (corners * weight[..., None]).sum(2)


def decompose(feature_fn, images: torch.Tensor, grid: int, cfg: FitConfig | None = None) -> dict:
    """Stage 1 on a batch of images (normalised, (B, C, H, W)); `feature_fn(views)` -> (B*V, N, C)
    patch features of the frozen ViT. Returns `clean` (B, N, C): S at the images' own patch
    centres, `artifact` G (B or 1, N, C), `raw` (B, N, C) the images' own features, and the losses."""
    cfg = cfg or FitConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    B = len(images)
    views, coords = make_views(images, grid, cfg.n_views, cfg.max_shift, gen, cfg.flip, cfg.zoom)
    with torch.no_grad():
        raw = feature_fn(views).float().view(B, cfg.n_views, grid * grid, -1)
    scale = raw.std().clamp_min(1e-6)  # fitted in units of the features' spread, so the lr does not depend on it
    raw = raw / scale
    C = raw.shape[-1]
    coords = coords.view(B, cfg.n_views * grid * grid, 2)
    valid = (coords.abs() <= 1 - 1 / grid + 1e-6).all(-1).view(B, cfg.n_views, grid * grid)  # patch inside the image
    R = cfg.field_scale * grid
    index, weight = bilinear_corners(coords, R)  # (B, V * N, 4) each
    with torch.no_grad():  # S starts at the image's own features, upsampled to its grid
        start = F.interpolate(raw[:, 0].transpose(1, 2).reshape(B, C, grid, grid), size=(R, R), mode="bilinear",
                              align_corners=False)
    field = nn.Parameter(start.flatten(2).transpose(1, 2).contiguous())  # (B, R * R, C)
    torch.manual_seed(cfg.seed)
    artifact = nn.Parameter(0.02 * torch.randn(1 if cfg.shared_artifact else B, 1, grid * grid, C))
    h = _BatchedMLP(B, C) if cfg.residual else None
    params = [field, artifact] + (list(h.parameters()) if h is not None else [])
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-15, weight_decay=1e-5)
    target, mask = raw, valid[..., None].float()
    n_valid = mask.sum().clamp_min(1)
    history = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _dvt_lr_factor(step, cfg.steps)
        late = step >= cfg.steps // 2  # G frozen, h on
        artifact.requires_grad_(not late)
        sem = read_field(field, index, weight).view(B, cfg.n_views, grid * grid, C)
        pred = sem + artifact
        loss_res = torch.zeros(())
        if late and h is not None:
            res = h(target.flatten(1, 2)).view_as(target)
            gt_res = (target - sem - artifact).detach()
            loss_res = 0.1 * (((res - gt_res) ** 2) * mask).sum() / (n_valid * C) + 0.02 * (res.abs() * mask).sum() / (
                n_valid * C)
            pred = pred + res.detach()
        mse = (((pred - target) ** 2) * mask).sum() / (n_valid * C)
        cos = 1 - (F.cosine_similarity(pred, target, dim=-1) * valid).sum() / n_valid
        loss = mse + cos + loss_res
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps - 1:
            history.append({"step": step, "mse": mse.item(), "cos_loss": cos.item(), "residual_loss": loss_res.item()})
    with torch.no_grad():  # view 0 is the image itself
        clean = read_field(field, index[:, : grid * grid], weight[:, : grid * grid])
    return {"clean": clean * scale, "artifact": artifact.detach()[:, 0] * scale, "raw": raw[:, 0] * scale,
            "history": history}


def decompose_all(model, images: torch.Tensor, cfg: FitConfig, batch_size: int = 64, on_images=None) -> dict:
    """Stage 1 over many images, `batch_size` images fitted together; returns the concatenated `raw`
    and `clean` features and, averaged over images, the norm of G's mean over positions (the part
    of G shared by every patch) and the mean norm of G's position-dependent rest."""
    grid = model.config.grid
    raws, cleans, shared, varying = [], [], [], []
    for i, x in enumerate(images.split(batch_size)):
        out = decompose(lambda v: patch_tokens(model, v), x, grid, FitConfig(**{**asdict(cfg), "seed": cfg.seed + i}))
        raws.append(out["raw"])
        cleans.append(out["clean"])
        g = out["artifact"]  # (B or 1, N, C)
        mean = g.mean(1, keepdim=True)
        shared.append(mean.norm(dim=-1).mean())
        varying.append((g - mean).norm(dim=-1).mean())
        if on_images is not None:  # a progress bar's update
            on_images(len(x))
    return {"raw": torch.cat(raws), "clean": torch.cat(cleans), "artifact_shared_norm": float(torch.stack(shared).mean()),
            "artifact_position_norm": float(torch.stack(varying).mean())}


# ------------------------------------------------------------------------------ stage 2
def feature_loss(pred, target):
    """MSE + (1 - cosine), DVT's (and PH-Reg's) feature-matching loss."""
    return F.mse_loss(pred, target) + 1 - F.cosine_similarity(pred, target, dim=-1).mean()


def train_denoiser(raw: torch.Tensor, clean: torch.Tensor, grid: int, steps: int = 600, batch_size: int = 64,
                   lr: float = 1e-3, n_blocks: int = 1, seed: int = 0) -> tuple[Denoiser, list[dict]]:
    """Stage 2: fit the denoiser on (raw, clean) pairs (M, N, C); AdamW (wd 1e-5), cosine decay with
    15% warmup as theirs (their base lr 2e-4 x sqrt(batch / 256) is for 40k steps; ours is higher)."""
    torch.manual_seed(seed)
    den = Denoiser(raw.shape[-1], grid, n_blocks)
    opt = torch.optim.AdamW(den.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-5)
    gen = torch.Generator().manual_seed(seed)
    warm = max(1, int(0.15 * steps))
    history = []
    for step in range(steps):
        f = step / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for g in opt.param_groups:
            g["lr"] = 1e-6 + (lr - 1e-6) * f
        idx = torch.randint(len(raw), (min(batch_size, len(raw)),), generator=gen)
        loss = feature_loss(den(raw[idx]), clean[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            history.append({"step": step, "loss": loss.item()})
    return den.eval(), history


# ------------------------------------------------------------------------------ measuring it
def position_share(tokens: torch.Tensor) -> float:
    """Share of the variance of patch features (B, N, C) that the patch position alone explains: the
    variance of the per-position mean over images, over the total. Objects sit anywhere in these
    images, so features that describe content have a small share; a position-tied artifact raises it."""
    centred = tokens.float() - tokens.float().mean((0, 1))
    return float(centred.mean(0).pow(2).sum(-1).mean() / centred.pow(2).sum(-1).mean())


def feature_stats(tokens: torch.Tensor, sigmas: float = 3.0) -> dict:
    """Position share and norm outliers (norm > mean + sigmas std) of final patch features (B, N, C).
    A final RMSNorm / LayerNorm leaves the raw features nearly one norm, so the outliers count
    little there; a denoiser's output is not normalised."""
    n = tokens.norm(dim=-1)
    thr = n.mean() + sigmas * n.std()
    return {"position_share": position_share(tokens), "outlier_fraction": float((n > thr).float().mean()),
            "max_over_median_norm": float(n.max() / n.median())}


@torch.no_grad()
def latency_ms(fn, x: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time of fn(x) in ms per image (after one warm-up call)."""
    fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2] / len(x)


def main(argv=None) -> dict:
    from eval.dense import dense_readouts_on_features
    from eval.vit_images import add_image_args, load_for_vit_eval

    from eval import check_writable, fail, nonnegative_float, positive_float, positive_int, write_json
    from eval.cli import checkpoint_info
    from eval.progress import progress
    from eval.result import CHECKPOINT_DEFINITION

    ap = argparse.ArgumentParser(prog="python -m fixes.vit_denoise", description=__doc__.split("\n\n")[0])
    add_image_args(ap)
    ap.add_argument("--n-fit", type=positive_int, default=256, help="train images decomposed in stage 1")
    ap.add_argument("--views", type=positive_int, default=16)
    ap.add_argument("--max-shift", type=nonnegative_float, default=2.0, help="largest view shift, in patches")
    ap.add_argument("--fit-steps", type=positive_int, default=400)
    ap.add_argument("--fit-batch", type=positive_int, default=64, help="images fitted together in stage 1")
    ap.add_argument("--denoiser-steps", type=positive_int, default=600)
    ap.add_argument("--denoiser-lr", type=positive_float, default=1e-3)
    ap.add_argument("--out", default=None, help="where the denoiser goes (default: <run>/eval/vit_denoise/)")
    args = ap.parse_args(argv)
    if args.out:
        check_writable(args.out)  # before the minutes of stages 1 and 2
    try:
        ctx = load_for_vit_eval(args)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))  # one line, exit code 2, as every eval
    model, data = ctx.model, ctx.data
    grid = model.config.grid
    fit_x = data.train_x[: args.n_fit]
    cfg = FitConfig(n_views=args.views, max_shift=args.max_shift, steps=args.fit_steps, seed=args.seed)
    t0 = time.perf_counter()
    with progress(len(fit_x), "decompose", unit="img") as bar:
        fit = decompose_all(model, fit_x, cfg, args.fit_batch, on_images=bar.update)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    den, history = train_denoiser(fit["raw"], fit["clean"], grid, args.denoiser_steps, lr=args.denoiser_lr,
                                  seed=args.seed)
    train_s = time.perf_counter() - t0
    out_dir = Path(args.out) if args.out else ctx.out / "vit_denoise"
    save_denoiser(den, out_dir, {"ckpt": args.ckpt, "data": ctx.data_source})

    raw_val = patch_tokens(model, data.val_x, args.batch_size)
    with torch.no_grad():
        den_val = den(raw_val)
        train_raw = patch_tokens(model, data.train_x[: args.n_probe_train], args.batch_size)
        den_train = den(train_raw)
    result = {
        "n_fit": len(fit_x), "fit": asdict(cfg), "stage1_seconds": fit_s, "stage2_seconds": train_s,
        "stage2_history": history, "artifact_shared_norm": fit["artifact_shared_norm"],
        "artifact_position_norm": fit["artifact_position_norm"], "raw_feature_norm": float(fit["raw"].norm(dim=-1).mean()),
        "stage1_clean_vs_raw_cosine": float(F.cosine_similarity(fit["clean"], fit["raw"], dim=-1).mean()),
        "raw": feature_stats(raw_val), "denoised": feature_stats(den_val),
        "params_added": sum(p.numel() for p in den.parameters()),
        "params_vit": sum(p.numel() for p in model.parameters()),
    }
    x = data.val_x[: min(64, len(data.val_x))]
    result["latency_ms_per_image"] = {"vit": latency_ms(lambda v: patch_tokens(model, v), x),
                                      "vit_plus_denoiser": latency_ms(lambda v: den(patch_tokens(model, v)), x)}
    if data.val_masks is not None:
        patch = model.config.patch_size
        masks = (data.train_masks[: args.n_probe_train], data.val_masks)
        result["dense_raw"] = dense_readouts_on_features(train_raw, masks[0], raw_val, masks[1], patch,
                                                         args.lost_k).readouts()
        result["dense_denoised"] = dense_readouts_on_features(den_train, masks[0], den_val, masks[1], patch,
                                                              args.lost_k).readouts()
    result["checkpoint"] = checkpoint_info(ctx.run)
    result["denoiser"] = str(out_dir)
    result["definitions"] = {
        "checkpoint": CHECKPOINT_DEFINITION,
        "position_share": "variance of the per-position mean of the held-out final patch features over their total "
                          "variance: how much of them the patch position alone explains",
        "outlier_fraction": "held-out final patch features whose norm exceeds mean + 3 std of all their norms (the "
                            "raw ones are normed, so this counts little before the denoiser)",
        "artifact_shared_norm / artifact_position_norm": "stage 1's G per image: the norm of its mean over the "
                                                         "positions, and the mean norm of the rest (what depends "
                                                         "on the position), next to raw_feature_norm",
        "dense_raw / dense_denoised": "LOST (on the features themselves: a denoiser has no keys) and the linear "
                                      "probe on the raw / denoised final patch features",
        "latency_ms_per_image": "median CPU wall time of the ViT forward to final patch features, without and with "
                                "the denoiser, per image in a batch of up to 64",
    }
    write_json(ctx.out / "vit_denoise.json", result)
    r, d = result["raw"], result["denoised"]
    lat = result["latency_ms_per_image"]
    print(f"position share {r['position_share']:.3f} -> {d['position_share']:.3f}; norm outliers "
          f"{100 * r['outlier_fraction']:.2f}% -> {100 * d['outlier_fraction']:.2f}%; denoiser +{result['params_added']} "
          f"params, {lat['vit']:.3f} -> {lat['vit_plus_denoiser']:.3f} ms/image")
    if "dense_raw" in result:
        a, b = result["dense_raw"], result["dense_denoised"]
        print(f"LOST CorLoc {100 * a['lost']['corloc']:.1f}% -> {100 * b['lost']['corloc']:.1f}%, probe mIoU "
              f"{a['probe']['miou']:.3f} -> {b['probe']['miou']:.3f}")
    print(f"-> {ctx.out / 'vit_denoise.json'}; denoiser in {out_dir}")
    return result


if __name__ == "__main__":
    from eval import run_main  # Ctrl-C: one line, exit 130

    run_main(main)
