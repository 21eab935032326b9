"""The images a ViT eval reads, prepared for the model: the run's own data, or `--data` for an import.

A lab run is evaluated on its own data source (its held-out split, normalised with the train
split's channel statistics), unless `--data` names another. A pretrained import (`hf:...`) has no
data of its own: `--data` names the images (digits, shapes, a local image folder with or without
class subfolders, a Pascal VOC folder or a COCO json, or an HF image dataset; data/images.py), which
are resized to the model's input size (`--image-size`, default its pretraining size; bilinear with
antialiasing, masks nearest), given three channels when the model takes three and the images have
one, and normalised with the model's pixel mean / std (its preprocessor_config.json). A student
distilled from an import keeps that normalisation (`image_normalisation` in its config).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


def add_image_args(ap) -> None:
    """The flags every ViT eval shares."""
    from . import positive_int

    ap.add_argument("--ckpt", required=True, help="a ViT run or checkpoint dir, or hf:<hub id or folder> "
                    "(Dinov2, Dinov2 with registers, ViT / DeiT, CLIP vision)")
    ap.add_argument("--data", default=None, help="image source: digits, shapes, an image folder (class subfolders "
                    "or none, any sizes), a Pascal VOC folder, a COCO json or an HF image dataset (required for hf:; "
                    "default: the run's own)")
    ap.add_argument("--image-size", type=positive_int, default=None,
                    help="input size of an hf: import (a multiple of its patch size; default: its pretraining size)")
    ap.add_argument("--n-images", type=positive_int, default=None, help="held-out images to use (default: all)")
    ap.add_argument("--n-probe-train", type=positive_int, default=1024,
                    help="train images for the linear patch probe (dense readouts, images with masks only)")
    ap.add_argument("--lost-k", type=positive_int, default=None, help="LOST's k (default: an eighth of the patches)")
    ap.add_argument("--batch-size", type=positive_int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)


@dataclass
class ModelImages:
    """Both splits ready for the model: normalised (N, C, S, S), labels, masks (N, S, S) or None."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    train_masks: torch.Tensor | None
    val_masks: torch.Tensor | None
    mean: torch.Tensor  # (C,) the pixel mean / std the images were normalised with
    std: torch.Tensor


@dataclass
class ViTEvalContext:
    run: object  # runs.load.LoadedRun
    model: torch.nn.Module
    data: ModelImages
    data_source: str
    data_config: dict  # the data: section the images came from
    normalisation: dict | None  # {"image_mean", "image_std"} when not the data's own statistics
    classifies: bool  # whether the model's head predicts this data's labels (accuracy means something)
    out: Path  # where the eval writes

    def dense_data(self, n_probe_train: int):
        """(train images, train masks, val images, val masks) for eval.dense, or None without masks."""
        d = self.data
        if d.val_masks is None:
            return None
        n = min(n_probe_train, len(d.train_x))
        return d.train_x[:n], d.train_masks[:n], d.val_x, d.val_masks


def model_normalisation(config: dict) -> dict | None:
    """The pixel mean / std a model takes: an import's, a student's inherited one, or None (the data's)."""
    if "hf" in config:
        return {"image_mean": config["hf"]["image_mean"], "image_std": config["hf"]["image_std"]}
    return config.get("image_normalisation")


def fit_to_model(x: torch.Tensor, masks: torch.Tensor | None, cfg, mean, std):
    """Images in [0, 1] -> the model's channels, size and normalisation; masks resized alike."""
    if x.shape[1] != cfg.in_channels:
        if x.shape[1] == 1:
            x = x.expand(-1, cfg.in_channels, -1, -1)
        else:
            raise ValueError(f"the images have {x.shape[1]} channels and the model takes {cfg.in_channels}")
    size = cfg.image_size
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if masks is not None:
            masks = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
    mean = torch.as_tensor(mean, dtype=x.dtype).flatten().expand(cfg.in_channels).contiguous()
    std = torch.as_tensor(std, dtype=x.dtype).flatten().expand(cfg.in_channels).contiguous()
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), masks, mean, std


def prepare(images, model_cfg, normalisation: dict | None, n_val: int | None = None) -> ModelImages:
    """An ImageSet (data/images.py) as the model takes it; `n_val` caps the held-out images."""
    if normalisation is None:
        mean, std = images.mean, images.std
    else:
        mean, std = normalisation["image_mean"], normalisation["image_std"]
    n = len(images.val_x) if n_val is None else min(n_val, len(images.val_x))
    vm = None if images.val_masks is None else images.val_masks[:n]
    tx, tm, mean, std = fit_to_model(images.train_x, images.train_masks, model_cfg, mean, std)
    vx, vm, _, _ = fit_to_model(images.val_x[:n], vm, model_cfg, mean, std)
    return ModelImages(tx, images.train_y, vx, images.val_y[:n], tm, vm, mean, std)


def model_images(run, model, data: str | None = None, n_val: int | None = None):
    """(ModelImages, the data: section they came from, whether the model's head predicts their
    labels) for a loaded ViT run or import; `data` replaces the run's image source."""
    from data.images import ImageDataConfig, load_images

    imported = "hf" in run.config
    if data is None and "data" not in run.config:
        raise ValueError(f"{run.checkpoint} is a pretrained model with no data of its own; name the images with "
                         "--data (digits, shapes, an image folder, a VOC folder, a COCO json or an HF image dataset)")
    fields = {k: v for k, v in (run.config.get("data") or {}).items()
              if k in {f.name for f in dataclasses.fields(ImageDataConfig)}}
    if data is not None:
        fields["source"] = data
    data_cfg = ImageDataConfig(**fields)
    images = load_images(data_cfg)
    prepared = prepare(images, model.config, model_normalisation(run.config), n_val)
    device = next(model.parameters()).device
    prepared.train_x, prepared.val_x = prepared.train_x.to(device), prepared.val_x.to(device)
    classifies = (not imported and model.config.head == "linear" and model.config.n_classes == images.n_classes
                  and data_cfg.source == (run.config.get("data") or {}).get("source"))
    return prepared, dataclasses.asdict(data_cfg), classifies


def load_for_vit_eval(args) -> ViTEvalContext:
    """Model (eval mode, on --device), images and output dir for a ViT eval's parsed flags."""
    from .cli import load, output_dir

    run = load(args.ckpt, args, task="vit")  # a bad path is one line, as in every eval
    if run.config.get("task", "lm") != "vit":
        raise ValueError(f"{args.ckpt} is a language-model run; a ViT eval needs a ViT (task: vit or hf: ViT)")
    model = run.model.eval()
    data, data_cfg, classifies = model_images(run, model, args.data, args.n_images)
    return ViTEvalContext(run, model, data, data_cfg["source"], data_cfg, model_normalisation(run.config),
                          classifies, output_dir(run, args.ckpt))


def pixel_fill(ctx: ViTEvalContext, value: float) -> torch.Tensor:
    """(C,) a constant pixel value in [0, 1] in the model's normalised space."""
    return (value - ctx.data.mean) / ctx.data.std
