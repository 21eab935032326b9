"""High-norm artifact tokens in a ViT (Darcet et al. 2024) and test-time registers (Jiang et al. 2025).

Per layer (residual stream after each block): the L2-norm distribution of the patch, CLS and
register tokens; outliers = patch tokens whose norm exceeds mean + 3 std of that layer's patch
norms (or a fixed `--threshold`); the outlier fraction; whether outliers sit on the image border
or inside it; how CLS splits its attention over CLS / registers / patches; and CLS-to-patch
attention maps of the last layer for a few images.

`--test-time-register`: rank the SwiGLU hidden units (the input of down_proj) of blocks 0..L by
their mean |activation| at outlier positions, take the top k ("register neurons"), then at
inference append one zero token after the patches and move those units' activations from the
patch tokens to it (zero on every patch, the patch value of largest magnitude on the new
token). Outlier fraction (same thresholds) and accuracy are reported with and without, on the
same images. On images with object masks (`source: shapes`) the dense readouts of eval/dense.py
(LOST CorLoc / mask IoU, linear-probe mIoU) are reported beside them, with and without.

    python -m eval.vit_artifacts --ckpt out/<run> [--threshold X] [--test-time-register --ttr-layer L --ttr-top-k K]
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .dense import DenseResult, dense_readouts, object_patches
from .result import EvalResult

SIGMAS = 3.0  # outliers: norm > mean + SIGMAS * std of the layer's patch-token norms
HIGH_NORM_FACTOR = 2.0  # the high-norm mode: patch norm > this x the layer's median patch norm


# ------------------------------------------------------------------------------ token layout
def token_slices(n_registers: int, n_patches: int) -> dict[str, slice]:
    """Positions in the sequence [CLS, registers, patches, (test-time register)]."""
    p = 1 + n_registers
    return {"cls": slice(0, 1), "registers": slice(1, p), "patches": slice(p, p + n_patches),
            "extra": slice(p + n_patches, None)}


def border_mask(grid: int) -> torch.Tensor:
    """(grid*grid,) bool, row-major like the patch tokens: True on the outer ring of patches."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return ((r == 0) | (c == 0) | (r == grid - 1) | (c == grid - 1)).flatten()


# ------------------------------------------------------------------------------ norms and outliers
def patch_thresholds(hidden, patches: slice, sigmas: float = SIGMAS) -> list[float]:
    """Per layer: mean + sigmas * std of the patch-token norms over all images."""
    out = []
    for h in hidden:
        n = h[:, patches].float().norm(dim=-1)
        out.append(float(n.mean() + sigmas * n.std()))
    return out


def find_outliers(hidden, patches: slice, threshold: float | list[float] | None = None) -> list[torch.Tensor]:
    """Per layer a (B, n_patches) bool mask of patch tokens whose norm exceeds the layer's threshold
    (a float for every layer, one per layer, or None = mean + 3 std of that layer's patch norms)."""
    if threshold is None:
        threshold = patch_thresholds(hidden, patches)
    if not isinstance(threshold, (list, tuple)):
        threshold = [float(threshold)] * len(hidden)
    return [h[:, patches].float().norm(dim=-1) > t for h, t in zip(hidden, threshold)]


def _summary(x: torch.Tensor) -> dict | None:
    if x.numel() == 0:
        return None
    x = x.float().flatten()
    q = torch.quantile(x, torch.tensor([0.5, 0.99]))
    return {"mean": float(x.mean()), "std": float(x.std()) if x.numel() > 1 else 0.0,
            "median": float(q[0]), "p99": float(q[1]), "max": float(x.max())}


def artifact_stats(hidden, n_registers: int, grid: int, threshold=None, background=None) -> list[dict]:
    """Per-layer norm distributions and outlier statistics (see the module docstring).

    Also the high-norm mode, scale-free: patch tokens above HIGH_NORM_FACTOR x the layer's median
    patch norm, their share and their mean norm over the median (an artifact mode of Darcet et
    al. is a few % of tokens at several times the typical norm; a unimodal tail gives ~0 here).
    `background` (B, n_patches) bool, True where a patch holds no object pixel: the share of
    outliers and of high-norm tokens that sit in the background."""
    sl = token_slices(n_registers, grid * grid)
    if threshold is None:
        threshold = patch_thresholds(hidden, sl["patches"])
    thresholds = threshold if isinstance(threshold, (list, tuple)) else [float(threshold)] * len(hidden)
    masks = find_outliers(hidden, sl["patches"], thresholds)
    border = border_mask(grid)
    layers = []
    for i, (h, mask, t) in enumerate(zip(hidden, masks, thresholds)):
        norms = h.float().norm(dim=-1)  # (B, T)
        n_out = int(mask.sum())
        patch_norms = norms[:, sl["patches"]]
        median = float(patch_norms.median())
        high = patch_norms > HIGH_NORM_FACTOR * median
        n_high = int(high.sum())
        layers.append({
            "layer": i,
            "patch_norm": _summary(norms[:, sl["patches"]]),
            "cls_norm": _summary(norms[:, sl["cls"]]),
            "register_norm": _summary(norms[:, sl["registers"]]),
            "extra_token_norm": _summary(norms[:, sl["extra"]]),
            "threshold": t,
            "n_outliers": n_out,
            "outlier_fraction": n_out / mask.numel(),
            "outliers_on_border": int(mask[:, border].sum()),
            "outlier_border_share": int(mask[:, border].sum()) / n_out if n_out else None,
            "high_norm_fraction": n_high / high.numel(),
            "high_norm_over_median": float(patch_norms[high].mean()) / median if n_high else None,
            "max_over_median": float(patch_norms.max()) / median,
        })
        if background is not None:
            layers[-1]["outlier_background_share"] = int(mask[background].sum()) / n_out if n_out else None
            layers[-1]["high_norm_background_share"] = int(high[background].sum()) / n_high if n_high else None
    return layers


# ------------------------------------------------------------------------------ running the model
@torch.no_grad()
def mlp_inputs(model, images) -> list[torch.Tensor]:
    """Per block, the SwiGLU hidden activation silu(gate(x)) * up(x) (down_proj's input), (B, T, hidden)."""
    acts, handles = [], []
    for block in model.layers:
        handles.append(block.mlp.down_proj.register_forward_pre_hook(lambda m, args: acts.append(args[0].cpu())))
    try:
        model(images)
    finally:
        for h in handles:
            h.remove()
    return acts


def find_register_neurons(acts, outlier_positions: torch.Tensor, max_layer: int, top_k: int) -> list[dict]:
    """The top_k (layer <= max_layer, unit) by mean |activation| over the outlier positions.

    acts: per layer (B, T, hidden); outlier_positions: (B, T) bool over the full sequence."""
    if not outlier_positions.any():
        return []
    scores = torch.stack([a[outlier_positions].abs().float().mean(0) for a in acts[: max_layer + 1]])  # (L, hidden)
    vals, flat = scores.flatten().topk(min(top_k, scores.numel()))
    return [{"layer": f // scores.shape[1], "unit": f % scores.shape[1], "score": v}
            for v, f in zip(vals.tolist(), flat.tolist())]


def find_register_neurons_reference(acts, hidden, norm_threshold: float, top_k: int, detect_layer: int = -1,
                                    max_layer: int | None = None, sparsity_filter: bool = False,
                                    sparsity_frac: float = 0.5, sparsity_activation: float = 0.5) -> list[dict]:
    """Jiang et al.'s register-neuron search (test-time-registers, shared/algorithms.py).

    Per image: outliers = tokens whose hidden-state norm at `detect_layer` exceeds the absolute
    `norm_threshold` (images without any are skipped); per layer and unit the mean |activation|
    over those tokens, optionally times a sparsity filter (units below `sparsity_activation` on
    at least `sparsity_frac` of the image's tokens); scores averaged over the images with
    outliers; the top_k (layer, unit) among layers <= max_layer (default: the detect layer,
    the highest layer where the outliers are seen)."""
    detect = detect_layer % len(hidden)
    cap = detect if max_layer is None else max_layer
    scores, used = register_neuron_scores(acts, hidden[detect], norm_threshold, sparsity_filter, sparsity_frac,
                                          sparsity_activation)
    return top_register_neurons(scores, used, cap, top_k)


def register_neuron_scores(acts, detect_hidden, norm_threshold: float, sparsity_filter: bool = False,
                           sparsity_frac: float = 0.5, sparsity_activation: float = 0.5) -> tuple[torch.Tensor, int]:
    """The sums behind `find_register_neurons_reference`: per (layer, unit) the per-image mean |activation|
    over the image's outliers (norm of `detect_hidden` (B, T, C) > norm_threshold) summed over images, and
    the number of images with outliers. Sums of batches add up to the sums of all the images."""
    scores, used = torch.zeros(len(acts), acts[0].shape[-1]), 0
    norms = detect_hidden.float().norm(dim=-1)  # (B, T)
    for b in range(norms.shape[0]):
        where = norms[b] > norm_threshold
        if not where.any():
            continue
        for layer in range(len(acts)):
            a = acts[layer][b].float()  # (T, units)
            score = a[where].abs().mean(0)
            if sparsity_filter:
                score = score * ((a < sparsity_activation).sum(0) >= sparsity_frac * a.shape[0]).float()
            scores[layer] += score.cpu()
        used += 1
    return scores, used


def top_register_neurons(scores: torch.Tensor, used: int, max_layer: int, top_k: int) -> list[dict]:
    """The top_k (layer <= max_layer, unit) of `register_neuron_scores`' sums averaged over the `used` images."""
    if not used:
        return []
    scores = scores[: max_layer + 1] / used
    vals, flat = scores.flatten().topk(min(top_k, scores.numel()))
    return [{"layer": f // scores.shape[1], "unit": f % scores.shape[1], "score": v}
            for v, f in zip(vals.tolist(), flat.tolist())]


def sign_max(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in `x`, with its sign (Jiang et al.'s `sign_max`)."""
    hi, lo = x.max(), x.min()
    return hi if hi.abs() > lo.abs() else lo


@contextmanager
def test_time_register(model, neurons: list[dict], rule: str = "ours", scale: float = 1.0):
    """Within the block: every forward of `model` (a ViT) appends one zero token after the patches,
    and the given MLP units are moved onto it.

    rule "ours": per unit, the new token takes the patch value of largest magnitude and the
    patches get 0. rule "reference" (Jiang et al.'s `activate_on_registers` hook): per image and
    layer, the new token takes `scale` x one scalar, the signed value of largest magnitude over
    all tokens and all of the layer's chosen units, and every token between CLS and the new one
    (patches, and trained registers if any) gets 0."""
    if rule not in ("ours", "reference"):
        raise ValueError(f"rule must be ours or reference, got {rule!r}")
    sl = token_slices(model.config.n_registers, model.config.n_patches)
    by_layer: dict[int, list[int]] = {}
    for n in neurons:
        by_layer.setdefault(n["layer"], []).append(n["unit"])

    def append_token(module, args, kwargs):
        x = args[0]
        return (torch.cat((x, x.new_zeros(x.shape[0], 1, x.shape[2])), dim=1), *args[1:]), kwargs

    def move_units(units):
        def hook(module, args):
            h = args[0].clone()
            if rule == "ours":
                patch = h[:, sl["patches"], units]  # (B, N, k)
                h[:, -1, units] = patch.gather(1, patch.abs().argmax(dim=1, keepdim=True)).squeeze(1)
                h[:, sl["patches"], units] = 0.0
            else:
                for b in range(h.shape[0]):  # the reference runs one image at a time
                    h[b, -1, units] = scale * sign_max(h[b][:, units])
                h[:, 1:-1, units] = 0.0
            return (h,)
        return hook

    handles = [model.layers[0].register_forward_pre_hook(append_token, with_kwargs=True)]
    handles += [model.layers[layer].mlp.down_proj.register_forward_pre_hook(move_units(units))
                for layer, units in by_layer.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_model(model, images, labels, batch_size: int = 128, attn: bool = True) -> dict:
    """Hidden states per layer, last-layer attention and accuracy over `images`, batched. `labels`
    None: the model's head does not predict these images' labels (an import), accuracy None."""
    from .progress import progress

    hidden, last_attn, correct = None, [], 0
    bar = progress(len(images), "eval.vit_artifacts", unit="img")
    label_batches = [None] * len(images.split(batch_size)) if labels is None else labels.split(batch_size)
    for x, y in zip(images.split(batch_size), label_batches):
        out = model(x, return_hidden=True, return_attn=attn)
        hs = [h.cpu() for h in out.hidden]
        hidden = hs if hidden is None else [torch.cat(p) for p in zip(hidden, hs)]
        if attn:
            last_attn.append(out.attn[-1].cpu())
        if y is not None:
            correct += int((out.logits.argmax(-1).cpu() == y).sum())
        bar.update(len(x))
    bar.close()
    accuracy = None if labels is None else correct / len(labels)
    return {"hidden": hidden, "attn": torch.cat(last_attn) if attn else None, "accuracy": accuracy}


def cls_attention_split(attn: torch.Tensor, n_registers: int, n_patches: int) -> dict:
    """Mean over images and heads of CLS's (proxy) attention on CLS, registers and patches."""
    row = attn[:, :, 0].float().mean(dim=(0, 1))
    sl = token_slices(n_registers, n_patches)
    return {k: float(row[s].sum()) for k, s in sl.items() if k != "extra"}


# ------------------------------------------------------------------------------ plots
def plot_norms(hidden, n_registers: int, grid: int, layers: list[dict], path) -> None:
    """Per layer: patch-token norm distribution (box), CLS and register norms, outlier threshold."""
    from .plots import save, subplots

    sl = token_slices(n_registers, grid * grid)
    fig, axes = subplots(1, 1, width=max(5.0, 1.2 * len(hidden)), height=4.0)
    ax = axes[0, 0]
    x = list(range(len(hidden)))
    ax.boxplot([h[:, sl["patches"]].float().norm(dim=-1).flatten().numpy() for h in hidden], positions=x,
               widths=0.5, flierprops={"markersize": 3})
    ax.plot(x, [l["cls_norm"]["mean"] for l in layers], "o", color="C3", label="CLS (mean)")
    if n_registers:
        ax.plot(x, [l["register_norm"]["mean"] for l in layers], "s", color="C2", label="registers (mean)")
    ax.plot(x, [l["threshold"] for l in layers], "_", color="k", markersize=20, label="outlier threshold")
    ax.set_xticks(x)
    ax.set_xlabel("block")
    ax.set_ylabel("token L2 norm")
    ax.set_title("patch-token norms per layer")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_attention_maps(images, attn, n_registers: int, grid: int, path, n_maps: int = 4) -> None:
    """Rows: image, last-layer CLS->patch attention (mean over heads), and register 0's when there is one."""
    from .plots import save, subplots

    sl = token_slices(n_registers, grid * grid)
    n = min(n_maps, len(images))
    rows = 3 if n_registers else 2
    fig, axes = subplots(rows, n, width=2.2, height=2.2)
    for j in range(n):
        img = images[j].float()
        axes[0, j].imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
        axes[1, j].imshow(attn[j, :, 0, sl["patches"]].mean(0).view(grid, grid).numpy(), cmap="viridis")
        if n_registers:
            axes[2, j].imshow(attn[j, :, 1, sl["patches"]].mean(0).view(grid, grid).numpy(), cmap="viridis")
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("CLS -> patches")
    if n_registers:
        axes[2, 0].set_ylabel("register 0 -> patches")
    save(fig, path)


def plot_ttr(base: list[dict], ttr: list[dict], path) -> None:
    from .plots import save, subplots

    fig, axes = subplots(1, 1, width=5.0, height=3.5)
    ax = axes[0, 0]
    x = [l["layer"] for l in base]
    ax.plot(x, [100 * l["outlier_fraction"] for l in base], "o-", label="model as trained")
    ax.plot(x, [100 * l["outlier_fraction"] for l in ttr], "s-", label="with test-time register")
    ax.set_xticks(x)
    ax.set_xlabel("block")
    ax.set_ylabel("outlier patch tokens (%)")
    ax.legend(fontsize=8)
    save(fig, path)


# ------------------------------------------------------------------------------ the whole analysis
@dataclass
class VitArtifactsResult(EvalResult):
    """Everything eval.vit_artifacts reports on one ViT (the module docstring): per-layer norm and outlier
    statistics (artifact_stats), CLS's attention split, the dense readouts on images with masks, and the
    test-time register's effect when it ran."""

    n_images: int
    accuracy: float | None  # None: the model's head does not predict these labels (an import)
    threshold_rule: str
    border_share_of_patches: float
    background_share_of_patches: float | None  # None without object masks
    layers: list
    cls_attention_last_layer: dict
    dense: DenseResult | None  # None without object masks
    model: dict
    test_time_register: dict | None = None  # with ttr_top_k: the neurons moved and the numbers with them
    _hidden: list | None = field(default=None, repr=False)  # per layer (N, T, C): the norm plot
    _attn: torch.Tensor | None = field(default=None, repr=False)  # last layer (N, H, T, T): the attention maps
    OPTIONAL = ("test_time_register",)

    DEFINITIONS = {
        "outlier_fraction": "patch tokens whose norm exceeds the layer's threshold (threshold_rule) / all patch tokens",
        "outlier_fraction_fixed": "the same against the absolute norm --fixed-threshold (present when given)",
        "high_norm_fraction": f"patch tokens with norm > {HIGH_NORM_FACTOR:g} x the layer's median patch norm / all "
                              "patch tokens; high_norm_over_median: their mean norm / that median",
        "background_share": "outlier_/high_norm_background_share: share of those tokens on patches without any "
                            "object pixel (images with masks); background_share_of_patches: the base rate",
        "rule": "test-time register: ours = units of blocks <= ttr_layer ranked by mean |activation| over "
                "outlier patches pooled over images, each moved as its patch value of largest magnitude, patches "
                "zeroed; reference = Jiang et al.: outliers = tokens with norm > fixed threshold at "
                "ttr_detect_layer, scores averaged per image then over images with outliers, units of blocks "
                "<= ttr_layer; the register gets, per image and layer, one scalar: the signed value of largest "
                "magnitude over all tokens and the layer's units; every token between CLS and the register "
                "(patches, trained registers) zeroed",
    }

    def to_json(self) -> dict:
        out = super().to_json()
        # the dense readouts nest without a checkpoint: this result's is theirs
        out["dense"] = _readouts(self.dense)
        if self.test_time_register is not None:
            out["test_time_register"] = {**self.test_time_register,
                                         "dense_with": _readouts(self.test_time_register["dense_with"])}
        return out


def _readouts(dense: DenseResult | None) -> dict | None:
    return None if dense is None else dense.readouts()


def analyse(model, images, labels, threshold=None, ttr_layer: int | None = None, ttr_top_k: int | None = None,
            batch_size: int = 128, fixed_threshold: float | None = None, ttr_rule: str = "ours",
            ttr_detect_layer: int = -1, dense_data: tuple | None = None) -> VitArtifactsResult:
    """Everything the CLI reports, on normalised `images` (N, C, H, W) with `labels` (N,).
    ttr_top_k set = also run the test-time-register intervention (units of blocks 0..ttr_layer).
    `fixed_threshold`: also report each layer's outlier fraction against that absolute norm.
    ttr_rule "reference": Jiang et al.'s neuron search (outliers = norm > fixed_threshold at
    ttr_detect_layer, default the last block; scores per image then averaged; units of blocks
    0..ttr_layer) and their intervention (test_time_register's "reference" rule).
    `dense_data` = (train images, train masks, val images, val masks): also the dense readouts
    (eval/dense.py: LOST, linear probe), with the test-time register too when it runs."""
    if ttr_rule not in ("ours", "reference"):
        raise ValueError(f"--ttr-rule must be ours or reference, got {ttr_rule!r}")
    if ttr_top_k and ttr_rule == "reference" and fixed_threshold is None:
        raise ValueError("--ttr-rule reference needs --fixed-threshold (the absolute norm that marks an outlier)")
    c = model.config
    base = run_model(model, images, labels, batch_size)
    sl = token_slices(c.n_registers, c.n_patches)
    thresholds = threshold if threshold is not None else patch_thresholds(base["hidden"], sl["patches"])
    background = None if dense_data is None else ~object_patches(dense_data[3], c.patch_size)
    layers = artifact_stats(base["hidden"], c.n_registers, c.grid, thresholds, background)
    if fixed_threshold is not None:
        for layer, mask in zip(layers, find_outliers(base["hidden"], sl["patches"], fixed_threshold)):
            layer["outlier_fraction_fixed"] = float(mask.float().mean())
    result = VitArtifactsResult(
        n_images=len(images),
        accuracy=base["accuracy"],
        threshold_rule=f"fixed {threshold}" if threshold is not None else f"mean + {SIGMAS:g} std of patch norms",
        border_share_of_patches=float(border_mask(c.grid).float().mean()),
        background_share_of_patches=None if background is None else float(background.float().mean()),
        layers=layers,
        cls_attention_last_layer=cls_attention_split(base["attn"], c.n_registers, c.n_patches),
        dense=None if dense_data is None else dense_readouts(model, *dense_data, batch_size=batch_size),
        model={"attention": c.attention, "gate": c.gate, "n_registers": c.n_registers, "n_layer": c.n_layer,
               "grid": c.grid, "pool": c.pool},
        _hidden=base["hidden"], _attn=base["attn"],
    )
    if ttr_top_k:
        layer = c.n_layer - 1 if ttr_layer is None else ttr_layer
        if not 0 <= layer < c.n_layer:
            raise ValueError(f"--ttr-layer {layer} is not a block index in [0, {c.n_layer - 1}]")
        if not -c.n_layer <= ttr_detect_layer < c.n_layer:
            raise ValueError(f"--ttr-detect-layer {ttr_detect_layer} is not a block index in [-{c.n_layer}, {c.n_layer - 1}]")
        detect = ttr_detect_layer % c.n_layer
        masks = find_outliers(base["hidden"], sl["patches"], thresholds)
        positions = torch.zeros(len(images), 1 + c.n_registers + c.n_patches, dtype=torch.bool)
        positions[:, sl["patches"]] = torch.stack(masks).any(0)  # flagged in any layer
        acts = [torch.cat(p) for p in zip(*(mlp_inputs(model, x) for x in images.split(batch_size)))]
        if ttr_rule == "reference":
            neurons = find_register_neurons_reference(acts, base["hidden"], fixed_threshold, ttr_top_k,
                                                      detect_layer=detect, max_layer=layer)
        else:
            neurons = find_register_neurons(acts, positions, layer, ttr_top_k)
        with test_time_register(model, neurons, rule=ttr_rule):
            ttr = run_model(model, images, labels, batch_size, attn=False)
            ttr_dense = None if dense_data is None else dense_readouts(model, *dense_data, batch_size=batch_size)
        ttr_layers = artifact_stats(ttr["hidden"], c.n_registers, c.grid, thresholds, background)
        result.test_time_register = {
            "ttr_layer": layer, "top_k": ttr_top_k, "rule": ttr_rule, "neurons": neurons,
            **({"ttr_detect_layer": detect} if ttr_rule == "reference" else {}),
            "n_outlier_positions": int(positions.sum()),
            "accuracy_without": base["accuracy"], "accuracy_with": ttr["accuracy"],
            "outlier_fraction_without": [l["outlier_fraction"] for l in layers],
            "outlier_fraction_with": [l["outlier_fraction"] for l in ttr_layers],
            "layers_with": ttr_layers,
            "dense_with": ttr_dense,
        }
    return result


def main(argv=None) -> list[VitArtifactsResult]:
    from . import HelpFormatter, add_tag_argument, fail, nonnegative_float, positive_int
    from .cli import check_paths, expand

    ap = argparse.ArgumentParser(prog="python -m eval.vit_artifacts", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--ckpt", nargs="+", required=True,
                    help="ViT run dirs, checkpoint dirs or globs, e.g. out/vit_digits or 'out/vit/*', or hf:<id or "
                    "folder> of a pretrained Dinov2 / Dinov2 with registers / ViT / CLIP vision model")
    ap.add_argument("--data", default=None, help="image source: digits, shapes, an image folder (class subfolders "
                    "or none, any sizes), a Pascal VOC folder, a COCO json or an HF image dataset (required for hf:; "
                    "default: the run's own)")
    ap.add_argument("--image-size", type=positive_int, default=None,
                    help="input size of an hf: import (a multiple of its patch size; default: its pretraining size)")
    ap.add_argument("--threshold", type=nonnegative_float, default=None, help="fixed norm threshold for outliers "
                    f"(default: mean + {SIGMAS:g} std of each layer's patch norms)")
    ap.add_argument("--n-images", type=positive_int, default=None, help="held-out images to use (default: all)")
    ap.add_argument("--n-maps", type=positive_int, default=4, help="images to draw attention maps for")
    add_tag_argument(ap)
    ap.add_argument("--test-time-register", action="store_true", help="also run the test-time register intervention")
    ap.add_argument("--ttr-layer", type=int, default=None, help="search MLP units in blocks 0..L (default: all)")
    ap.add_argument("--ttr-detect-layer", type=int, default=-1,
                    help="--ttr-rule reference: the block whose output norms mark the outliers (default -1: the last)")
    ap.add_argument("--ttr-top-k", type=positive_int, default=4, help="number of register neurons to move")
    ap.add_argument("--fixed-threshold", type=nonnegative_float, default=None,
                    help="also report the outlier fraction against this absolute norm (Jiang et al. use 30 on CLIP)")
    ap.add_argument("--ttr-rule", choices=["ours", "reference"], default="ours",
                    help="reference: Jiang et al.'s neuron search and intervention (needs --fixed-threshold)")
    ap.add_argument("--n-probe-train", type=positive_int, default=1024,
                    help="train images for the linear patch probe (dense readouts, images with masks only)")
    ap.add_argument("--batch-size", type=positive_int, default=128)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if args.test_time_register and args.ttr_rule == "reference" and args.fixed_threshold is None:
        fail("--ttr-rule reference needs --fixed-threshold (the absolute norm that marks an outlier)")
    paths = expand(args.ckpt)
    check_paths(paths)
    results = []
    for path in paths:
        try:
            results.append(evaluate_checkpoint(path, args))
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
    return results


def evaluate_checkpoint(path: str, args) -> VitArtifactsResult:
    """The CLI's work on one ViT checkpoint: analyse, plot, write vit_artifacts.json."""
    from . import flags_of, keep_other_result, with_flags, write_json
    from .cli import checkpoint_info, load, output_dir
    from .vit_images import model_images

    run = load(path, args, task="vit")
    if run.config.get("task", "lm") != "vit":
        raise ValueError(f"{path} is a language-model run; vit_artifacts needs a ViT run (task: vit)")
    model = run.model.eval()
    images, _, classifies = model_images(run, model, args.data, args.n_images)
    out = output_dir(run, path, args.tag)
    keep_other_result(out / "vit_artifacts.json", flags_of(args))  # before the analysis, as every eval
    x, n = images.val_x, len(images.val_x)
    y = images.val_y if classifies else None  # an import's head does not predict these labels
    dense_data = None
    if images.val_masks is not None:  # images with object masks: the dense readouts too
        m = min(args.n_probe_train, len(images.train_x))
        dense_data = (images.train_x[:m], images.train_masks[:m], x, images.val_masks)
    result = analyse(model, x, y, args.threshold, args.ttr_layer,
                     args.ttr_top_k if args.test_time_register else None, args.batch_size,
                     args.fixed_threshold, args.ttr_rule, args.ttr_detect_layer, dense_data)
    c = model.config
    result.checkpoint = checkpoint_info(run)
    plot_norms(result._hidden, c.n_registers, c.grid, result.layers, out / "vit_norms.png")
    shown = x.cpu().flatten(1)  # normalised images back to [0, 1] per image, for the plot
    shown = (shown - shown.amin(1, keepdim=True)) / (shown.amax(1, keepdim=True) - shown.amin(1, keepdim=True)).clamp_min(1e-6)
    plot_attention_maps(shown.view_as(x), result._attn, c.n_registers, c.grid, out / "vit_attention.png", args.n_maps)
    result._hidden = result._attn = None  # drawn: the results main returns, one per checkpoint, hold no tensors
    ttr = result.test_time_register
    if ttr is not None:
        plot_ttr(result.layers, ttr["layers_with"], out / "vit_ttr.png")
    write_json(out / "vit_artifacts.json", with_flags(result.to_json(), flags_of(args)))
    fr = ", ".join(f"{100 * l['outlier_fraction']:.1f}" for l in result.layers)
    acc = "n/a (no class head for these labels)" if result.accuracy is None else f"{result.accuracy:.4f}"
    print(f"accuracy {acc} on {n} held-out images; outlier % per block: {fr}")
    if ttr is not None:
        fr = ", ".join(f"{100 * f:.1f}" for f in ttr["outlier_fraction_with"])
        acc = "n/a" if ttr["accuracy_with"] is None else f"{ttr['accuracy_with']:.4f}"
        print(f"test-time register ({len(ttr['neurons'])} units): accuracy {acc}; "
              f"outlier % per block: {fr}")
    for name, d in (("dense", result.dense), ("dense with test-time register", ttr and ttr["dense_with"])):
        if d:
            print(f"{name}: LOST CorLoc {100 * d.lost['corloc']:.1f}%, mask IoU {d.lost['mask_iou']:.3f}; "
                  f"linear probe mIoU {d.probe['miou']:.3f}")
    print(f"-> {out / 'vit_artifacts.json'}")
    return result


if __name__ == "__main__":
    from eval import run_main  # Ctrl-C: one line, exit 130

    run_main(main)
