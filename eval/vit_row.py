"""One ViT's row of the artifact table on real images with boxes: LOST CorLoc as the model is, with
Jiang et al.'s test-time register, and (a model with registers) without its registers; the share of
high-norm patch tokens per block for each; the latency the test-time register adds.

`--data` is a Pascal VOC folder, a COCO json or an HF dataset with boxes (data/boxes.py); images
are fitted to the model's input and LOST is scored as in eval/dense.py (valeoai/LOST's box and
IoU). The test-time register
follows Jiang et al.'s code (eval/vit_artifacts.py, rule `reference`): on the first `--n-search`
images, outliers = tokens whose norm after block `--detect-layer` exceeds `--threshold`; per image
the mean |activation| of each MLP unit over them, averaged over the images that have any; the
top `--top-k` units of blocks 0..`--highest-layer` are moved, per image and block, onto one
appended token (the signed value of largest magnitude), zero on every other token but CLS.
Jiang et al.'s DINOv2 ViT-L/14 setting (their configs/dinov2_large.yaml): threshold 150, detect
layer -2, highest layer 17, top k 50. High-norm share: patch tokens above 2x the block's median
patch norm as the model is (the same cut-off for every variant), and above `--threshold`.
Latency: wall time of the model's forward passes per image (batch `--batch-size`, after one
warm-up batch), synchronised on CUDA.

    python -m eval.vit_row --ckpt hf:facebook/dinov2-large --data VOCdevkit/VOC2007 \\
        --threshold 150 --detect-layer -2 --highest-layer 17 --top-k 50
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from .dense import LOST_K, box_batches, box_normalisation, corloc_summary, lost_on_batch
from .result import EvalResult
from .vit_artifacts import HIGH_NORM_FACTOR, register_neuron_scores, test_time_register, top_register_neurons


@dataclass
class VitRowResult(EvalResult):
    DEFINITIONS = {"row": __doc__.split("\n\n")[1]}
    OPTIONAL = ("data", "split", "device")
    n_images: int
    n_norm_images: int
    image_size: int
    patch_size: int
    n_registers: int
    fit: str
    k: int
    ttr: dict  # the test-time register's threshold rule, search and units; latency_added when it ran
    variants: dict  # as_is / test_time_register / without_registers -> CorLoc, hits, norm shares, ms per image
    data: str | None = None  # what the CLI read (the library function leaves these unset)
    split: str | None = None
    device: str | None = None


@contextmanager
def without_registers(model):
    """Within the block the ViT runs without its trained register tokens: [CLS, patches]."""
    saved, n = model.registers, model.config.n_registers
    model.registers, model.config.n_registers = None, 0
    try:
        yield model
    finally:
        model.registers, model.config.n_registers = saved, n


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, items, mean, std, fit: str, batch_size: int, k: int, n_norm: int, intervention=nullcontext):
    """LOST CorLoc, per-block patch norms of the first `n_norm` images, and forward seconds per image,
    with `intervention()` (a context manager) in effect."""
    c = model.config
    device = next(model.parameters()).device
    attn = model.layers[-1].self_attn
    per_image, norms, seconds, warm = [], [], 0.0, False
    with intervention():
        start_tok = model.patch_start
        for chunk, x, scales, extents in box_batches(model, items, mean, std, fit, batch_size):
            if not warm:  # one untimed pass: allocator and kernel selection
                model(x)
                warm = True
            grabbed = []
            handle = attn.k_proj.register_forward_hook(lambda m, a, out: grabbed.append(out))
            try:
                _sync(device)
                t0 = time.perf_counter()
                out = model(x, return_hidden=True)
                _sync(device)
                seconds += time.perf_counter() - t0
            finally:
                handle.remove()
            keys = grabbed[0]
            if getattr(attn, "k_norm", None) is not None:
                B, T, _ = keys.shape
                keys = attn.k_norm(keys.view(B, T, -1, c.head_dim)).view(B, T, -1)
            keys = keys[:, start_tok : start_tok + c.n_patches].float().cpu()
            per_image += lost_on_batch(keys, chunk, scales, extents, c.patch_size, k)
            if sum(n.shape[1] for n in norms) < n_norm:
                norms.append(torch.stack([h[:, start_tok : start_tok + c.n_patches].float().norm(dim=-1).cpu()
                                          for h in out.hidden]))  # (L, B, N)
    norms = torch.cat(norms, dim=1)[:, :n_norm] if norms else None
    return {"lost": corloc_summary(per_image, k), "norms": norms, "seconds_per_image": seconds / len(items)}


@torch.no_grad()
def search_neurons(model, items, mean, std, fit: str, batch_size: int, threshold: float, detect_layer: int,
                   highest_layer: int, top_k: int) -> dict:
    """Jiang et al.'s register-neuron search over `items`, batch by batch (eval/vit_artifacts.py)."""
    acts, handles = [], []
    for block in model.layers[: highest_layer + 1]:
        handles.append(block.mlp.down_proj.register_forward_pre_hook(lambda m, args: acts.append(args[0])))
    total, used = None, 0
    t0 = time.perf_counter()
    try:
        for _, x, _, _ in box_batches(model, items, mean, std, fit, batch_size):
            acts.clear()
            out = model(x, return_hidden=True)
            scores, n = register_neuron_scores(acts, out.hidden[detect_layer], threshold)
            total = scores if total is None else total + scores
            used += n
    finally:
        for h in handles:
            h.remove()
    neurons = top_register_neurons(total, used, highest_layer, top_k)
    return {"neurons": neurons, "images_with_outliers": used, "n_search": len(items),
            "search_seconds": time.perf_counter() - t0}


def norm_summary(norms: torch.Tensor, medians: torch.Tensor, threshold: float | None) -> dict:
    """Per block: share of patch tokens above HIGH_NORM_FACTOR x `medians` (the model-as-is medians) and
    above `threshold`; max / median. norms (L, B, N)."""
    flat = norms.flatten(1)
    out = {"high_norm_share": (flat > HIGH_NORM_FACTOR * medians[:, None]).float().mean(1).tolist(),
           "max_over_median": (flat.max(1).values / medians).tolist(),
           "median": flat.median(1).values.tolist()}
    if threshold is not None:
        out["above_threshold_share"] = (flat > threshold).float().mean(1).tolist()
    return out


def vit_row(model, items, norm: dict, fit: str = "pad", batch_size: int = 8, k: int = LOST_K,
            threshold: float | None = None, detect_layer: int = -1, highest_layer: int | None = None,
            top_k: int = 50, n_search: int = 100, n_norm: int = 256, threshold_factor: float = HIGH_NORM_FACTOR) -> VitRowResult:
    """Everything the CLI prints (module docstring) for a ViT on BoxedImage `items`."""
    c = model.config
    mean, std = norm["image_mean"], norm["image_std"]
    detect = detect_layer % c.n_layer
    highest = detect if highest_layer is None else highest_layer
    if not 0 <= highest < c.n_layer:
        raise ValueError(f"--highest-layer {highest} is not a block index in [0, {c.n_layer - 1}]")
    base = measure(model, items, mean, std, fit, batch_size, k, n_norm)
    medians = base["norms"].flatten(1).median(1).values
    if threshold is None:  # scale-free: a multiple of the detection block's median patch norm
        threshold = float(threshold_factor * medians[detect])
        rule = f"{threshold_factor:g} x the median patch norm after block {detect} ({threshold:.1f})"
    else:
        rule = f"fixed {threshold:g}"
    search = search_neurons(model, items[:n_search], mean, std, fit, batch_size, threshold, detect, highest, top_k)
    variants = {"as_is": base}
    if search["neurons"]:
        variants["test_time_register"] = measure(model, items, mean, std, fit, batch_size, k, n_norm,
                                                 lambda: test_time_register(model, search["neurons"], "reference"))
    if c.n_registers:
        variants["without_registers"] = measure(model, items, mean, std, fit, batch_size, k, n_norm,
                                                lambda: without_registers(model))
    ttr = {"threshold_rule": rule, "threshold": threshold, "detect_layer": detect, "highest_layer": highest,
           "top_k": top_k, **search}
    rows = {}
    for name, v in variants.items():
        rows[name] = {"corloc": v["lost"]["corloc"], "hits": v["lost"]["hits"],
                                    "positive_share": v["lost"]["positive_share"],
                                    "ms_per_image": 1000 * v["seconds_per_image"],
                                    **norm_summary(v["norms"], medians, threshold), "per_image": v["lost"]["per_image"]}
    if "test_time_register" in variants:
        ttr["latency_added"] = variants["test_time_register"]["seconds_per_image"] / base["seconds_per_image"] - 1
    return VitRowResult(n_images=len(items), n_norm_images=int(base["norms"].shape[1]), image_size=c.image_size,
                        patch_size=c.patch_size, n_registers=c.n_registers, fit=fit, k=k, ttr=ttr, variants=rows)


def _layers(xs, pct: bool = True) -> str:
    return " ".join(f"{100 * x:.1f}" if pct else f"{x:.1f}" for x in xs)


def main(argv=None) -> VitRowResult:
    from . import fail, positive_int, write_json
    from .cli import checkpoint_info, output_dir
    from .dense import add_box_args, load_boxed_vit
    from .vit_images import add_image_args

    ap = argparse.ArgumentParser(prog="python -m eval.vit_row", description=__doc__.split("\n\n")[0])
    add_image_args(ap)
    add_box_args(ap)
    ap.add_argument("--threshold", type=float, default=None, help="the norm above which a token is an outlier "
                    f"(Jiang et al.: 150 on DINOv2 ViT-L/14; default {HIGH_NORM_FACTOR:g}x the median patch norm "
                    "after the detection block)")
    ap.add_argument("--threshold-factor", type=float, default=HIGH_NORM_FACTOR, help="without --threshold: "
                    "the threshold is this x the detection block's median patch norm")
    ap.add_argument("--detect-layer", type=int, default=-1, help="the block whose output norms mark the outliers")
    ap.add_argument("--highest-layer", type=int, default=None, help="search units of blocks 0..L (default: the "
                    "detection block)")
    ap.add_argument("--top-k", type=positive_int, default=50, help="register neurons to move")
    ap.add_argument("--n-search", type=positive_int, default=100, help="images for the neuron search (the first ones)")
    ap.add_argument("--n-norm-images", type=positive_int, default=256, help="images whose norms are summarised")
    args = ap.parse_args(argv)
    if args.threshold_factor <= 0:
        fail(f"--threshold-factor must be > 0, got {args.threshold_factor}")
    if args.data is None:
        fail("--data must name a Pascal VOC folder, a COCO json or an HF dataset with boxes (--box-format): the "
             "images LOST is scored on")
    try:
        items, run, model = load_boxed_vit(args, "eval.vit_row")
        if not -model.config.n_layer <= args.detect_layer < model.config.n_layer:
            raise ValueError(f"--detect-layer {args.detect_layer} is not a block index of this "
                             f"{model.config.n_layer}-block model")
        norm = box_normalisation(run.config, model, items, args.fit)
        result = vit_row(model, items, norm, args.fit, args.batch_size, args.lost_k or LOST_K, args.threshold,
                         args.detect_layer, args.highest_layer, args.top_k, args.n_search, args.n_norm_images,
                         args.threshold_factor)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    result.data, result.split, result.device = str(args.data), args.split, str(next(model.parameters()).device)
    result.checkpoint = checkpoint_info(run)
    out = output_dir(run, args.ckpt)
    write_json(out / "vit_row.json", result.to_json())
    v, t = result.variants, result.ttr
    cols = {"as_is": "as is", "test_time_register": "+ test-time register", "without_registers": "- its registers"}
    print(f"{args.ckpt} on {args.data}: {result.n_images} images at {result.image_size}px, patch "
          f"{result.patch_size}, {result.n_registers} registers; outliers: norm > {t['threshold_rule']}, "
          f"{len(t['neurons'])} units of blocks 0-{t['highest_layer']} "
          f"({t['images_with_outliers']}/{t['n_search']} search images had outliers)")
    for name, r in v.items():
        print(f"  {cols[name]:<22} CorLoc {100 * r['corloc']:5.1f}% ({r['hits']}/{result.n_images})  "
              f"{r['ms_per_image']:.1f} ms/image; positive patch-key pairs {100 * r['positive_share']:.0f}%")
        print(f"    high-norm % per block (> {HIGH_NORM_FACTOR:g}x median): {_layers(r['high_norm_share'])}")
        print(f"    above {t['threshold']:.1f} % per block:            {_layers(r['above_threshold_share'])}")
    if not t["neurons"]:
        print("  test-time register: no token above the threshold in the search images, so no units to move "
              "(not run; --threshold lower to force a search)")
    if "latency_added" in t:
        print(f"  test-time register latency added: {100 * t['latency_added']:+.1f}% (search: "
              f"{t['search_seconds']:.1f} s once)")
    print(f"-> {out / 'vit_row.json'}")
    return result


if __name__ == "__main__":
    main()
