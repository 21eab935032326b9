"""Image classification data for the ViT: embedded digits, synthetic shapes or an HF image dataset.

`source: digits` is scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes,
read from the installed package, no download); `source: shapes` draws objects on a flat or
noisy background with per-pixel object masks (data/shapes.py, no download); a local folder is
read by data/image_folder.py (class subfolders or none, any size and mode; a Pascal VOC folder
or a COCO json gives its images, label 0); any other source is an HF hub image dataset (e.g.
`uoft-cs/cifar10`) loaded with `datasets.load_dataset`. Images of mixed sizes (a folder, or a
hub dataset such as VOC's) are resized to `folder_size` x `folder_size` (bilinear, antialiased)
so that they stack; a ViT eval then fits them to the model's input. The held-out split is the
dataset's `test` split when it has one, else a seeded `val_fraction` of the images (shapes draws
its two splits separately).

ImageBatchLoader has BatchLoader's interface and determinism: the global batch of a step is
drawn from a generator seeded by (seed, split, step), augmentation included, and micro-step m
on rank r takes rows [(m*world + r)*B, +B), so resume and world-size changes are exact.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .boxes import is_boxed, read_boxed
from .image_folder import GREY_MODES, folder_channels, is_image_folder, list_folder, read_image
from .loader import seed_from_key
from .prepare import split_documents
from .shapes import BACKGROUNDS, LABELS, make_shapes, n_classes

DIGITS = "digits"
SHAPES = "shapes"


@dataclass
class ImageDataConfig:
    """Fields of the `data:` section when `task: vit`."""

    source: str = DIGITS  # "digits" (embedded), "shapes" (synthetic, with masks) or an HF hub image dataset name
    hub_config: str | None = None  # HF dataset config name
    image_field: str | None = None  # None = "image" or "img", whichever the dataset has
    label_field: str = "label"  # the record field holding the class index
    val_fraction: float = 0.2  # used when the source has no test split
    max_images: int | None = None  # cap on training images (hub datasets); None = all
    folder_size: int = 224  # side that images of mixed sizes (folders, some hub datasets) are resized to
    augment_shift: int = 1  # random translation by up to this many pixels (training only)
    augment_flip: bool = False  # random horizontal flips (natural images; not digits)
    seed: int = 1337  # the train / val split and the augmentations
    # source: shapes only (data/shapes.py)
    shapes_size: int = 32  # image side in pixels
    shapes_train: int = 4096  # images per split
    shapes_val: int = 512  # held-out images
    shapes_max_objects: int = 3  # at most this many shapes per image
    shapes_background: str = "noise"  # "flat" or "noise"
    shapes_label: str = "kinds"  # "kinds" (which shapes occur, 7 classes) or "count" (how many objects)

    def validate(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"data.source must be 'digits', 'shapes' or an HF image dataset name, got {self.source!r}")
        if self.source == SHAPES:
            if self.shapes_background not in BACKGROUNDS or self.shapes_label not in LABELS:
                raise ValueError(f"data.shapes_background must be one of {list(BACKGROUNDS)} and data.shapes_label "
                                 f"one of {list(LABELS)}, got {self.shapes_background!r}, {self.shapes_label!r}")
            if self.shapes_size < 16 or self.shapes_train < 2 or self.shapes_val < 1:
                raise ValueError("data.shapes_size must be >= 16 pixels and data.shapes_train >= 2, "
                                 f"data.shapes_val >= 1 images, got {self.shapes_size}, {self.shapes_train}, "
                                 f"{self.shapes_val}")
            if not 1 <= self.shapes_max_objects <= 8:
                raise ValueError(f"data.shapes_max_objects must be in [1, 8], got {self.shapes_max_objects}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.max_images is not None and self.max_images < 2:
            raise ValueError(f"data.max_images must be null or an integer >= 2, got {self.max_images!r}")
        if self.folder_size < 1:
            raise ValueError(f"data.folder_size must be a positive number of pixels, got {self.folder_size}")
        if self.augment_shift < 0:
            raise ValueError(f"data.augment_shift must be >= 0 pixels, got {self.augment_shift}")


@dataclass
class ImageSet:
    """Both splits as float images in [0, 1] (N, C, H, W) + long labels, and the train-split
    per-channel mean / std that every batch is normalised with. Sources with dense labels
    (shapes) also give per-pixel instance masks (N, H, W), 0 = background; others None."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    n_classes: int
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    train_masks: torch.Tensor | None = None
    val_masks: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def loader(self, split: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
               grad_accum: int = 1, cfg: ImageDataConfig | None = None) -> "ImageBatchLoader":
        x, y = (self.train_x, self.train_y) if split == "train" else (self.val_x, self.val_y)
        cfg = cfg or ImageDataConfig()
        return ImageBatchLoader(x, y, self.mean, self.std, split, batch_size, seed, rank, world_size, grad_accum,
                                shift=cfg.augment_shift, flip=cfg.augment_flip)


def _digits(cfg: ImageDataConfig):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images / 16.0).float().unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
    y = torch.from_numpy(d.target).long()
    tr, va = split_documents(len(y), cfg.val_fraction, cfg.seed)
    return x[tr], y[tr], x[va], y[va]


def _hub(cfg: ImageDataConfig):
    from datasets import load_dataset

    try:
        ds = load_dataset(cfg.source, cfg.hub_config)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; the user needs the name and the cause
        raise ValueError(f"data.source={cfg.source!r} could not be loaded as an HF image dataset ({e}); "
                         "use data.source=digits for the embedded data") from None
    train = ds["train"]
    field = cfg.image_field or next((f for f in ("image", "img") if f in train.column_names), None)
    if field is None or field not in train.column_names or cfg.label_field not in train.column_names:
        raise ValueError(f"{cfg.source} has columns {train.column_names}; set data.image_field and "
                         "data.label_field to its image and label columns")

    def arrays(split):
        if cfg.max_images is not None:
            split = split.select(range(min(cfg.max_images, len(split))))
        pil = split[field]
        grey = all(im.mode in GREY_MODES for im in pil)  # one channel only when every image has one
        imgs = [np.asarray(im.convert("L" if grey else "RGB")) for im in pil]
        return stack_images(imgs, cfg.folder_size), torch.tensor(split[cfg.label_field]).long()

    if "test" in ds:
        return (*arrays(train), *arrays(ds["test"]))
    x, y = arrays(train)
    tr, va = split_documents(len(y), cfg.val_fraction, cfg.seed)
    return x[tr], y[tr], x[va], y[va]


def stack_images(arrays: list[np.ndarray], size: int) -> torch.Tensor:
    """(H, W[, C]) uint8 images -> (N, C, H, W) floats in [0, 1]; mixed sizes resized to size x size."""
    xs = [torch.from_numpy(np.array(a if a.ndim == 3 else a[..., None])).permute(2, 0, 1).float() / 255.0
          for a in arrays]
    if len({tuple(x.shape) for x in xs}) > 1:
        xs = [F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
              .clamp(0, 1) for x in xs]
    return torch.stack(xs)


def _folder(cfg: ImageDataConfig):
    """A local image folder, or the images of a VOC folder / COCO json (data/image_folder.py, data/boxes.py)."""
    if is_boxed(cfg.source):
        paths = [b.path for b in read_boxed(cfg.source)]
        labels = [0] * len(paths)
    else:
        paths, labels, _ = list_folder(cfg.source)
    if cfg.max_images is not None:
        paths, labels = paths[: cfg.max_images], labels[: cfg.max_images]
    channels = folder_channels(paths)
    x = stack_images([read_image(p, channels) for p in paths], cfg.folder_size)
    y = torch.tensor(labels).long()
    if len(y) < 2:
        raise ValueError(f"data.source={cfg.source!r} holds {len(y)} image; a train and a held-out split need 2")
    tr, va = split_documents(len(y), cfg.val_fraction, cfg.seed)
    return x[tr], y[tr], x[va], y[va]


def is_local(source: str) -> bool:
    return is_image_folder(source) or is_boxed(source)


def _shapes(cfg: ImageDataConfig) -> ImageSet:
    kw = dict(seed=cfg.seed, size=cfg.shapes_size, max_objects=cfg.shapes_max_objects,
              background=cfg.shapes_background, label=cfg.shapes_label)
    train_x, train_y, train_m = make_shapes(cfg.shapes_train, "train", **kw)
    val_x, val_y, val_m = make_shapes(cfg.shapes_val, "val", **kw)
    return ImageSet(train_x, train_y, val_x, val_y, n_classes(cfg.shapes_label, cfg.shapes_max_objects),
                    *_channel_stats(train_x), train_masks=train_m, val_masks=val_m)


def _channel_stats(train_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return train_x.mean(dim=(0, 2, 3)), train_x.std(dim=(0, 2, 3)).clamp_min(1e-6)


def load_images(cfg: ImageDataConfig) -> ImageSet:
    """Both splits of `cfg.source`, with the train split's channel statistics."""
    cfg.validate()
    if cfg.source == SHAPES:
        return _shapes(cfg)
    read = _digits if cfg.source == DIGITS else _folder if is_local(cfg.source) else _hub
    train_x, train_y, val_x, val_y = read(cfg)
    n_classes = int(max(train_y.max(), val_y.max())) + 1
    return ImageSet(train_x, train_y, val_x, val_y, n_classes, *_channel_stats(train_x))


class ImageBatchLoader:
    """(images, labels) batches: train rows drawn at random with augmentation, val in fixed order."""

    def __init__(self, images, labels, mean, std, split: str, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, grad_accum: int = 1, shift: int = 0, flip: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.images, self.labels = images, labels
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.shift, self.flip = shift, flip

    def __len__(self) -> int:
        return len(self.labels)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def get_batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch of `step`, for one micro-step."""
        if not 0 <= micro_step < self.grad_accum:
            raise ValueError(f"micro_step must be in [0, {self.grad_accum}), got {micro_step}")
        n_rows = self.batch_size * self.world_size * self.grad_accum
        gen = torch.Generator().manual_seed(seed_from_key(f"{self.seed}/{self.split}/{step}"))
        idx = torch.randint(len(self), (n_rows,), generator=gen)
        shifts = torch.randint(-self.shift, self.shift + 1, (n_rows, 2), generator=gen)
        flips = torch.rand(n_rows, generator=gen) < 0.5
        rows = slice((micro_step * self.world_size + self.rank) * self.batch_size,
                     (micro_step * self.world_size + self.rank + 1) * self.batch_size)
        x = self.images[idx[rows]]
        if self.split == "train":
            x = augment(x, shifts[rows] if self.shift else None, flips[rows] if self.flip else None)
        return self.normalise(x), self.labels[idx[rows]]

    def eval_windows(self, n_images: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first n_images of the split in batches of at most batch_size, unaugmented: the same
        every call whatever the batch size, and the whole split once n_images >= len(split)."""
        n = min(n_images, len(self))
        for i in range(0, n, self.batch_size):
            sl = slice(i, min(i + self.batch_size, n))
            yield self.normalise(self.images[sl]), self.labels[sl]


def augment(x: torch.Tensor, shifts: torch.Tensor | None, flips: torch.Tensor | None) -> torch.Tensor:
    """Translate each image by shifts[i] = (dy, dx) pixels (zero fill) and mirror where flips[i]."""
    if flips is not None:
        x = torch.where(flips.view(-1, 1, 1, 1), x.flip(-1), x)
    if shifts is not None:
        s = int(shifts.abs().max())
        if s:
            H, W = x.shape[-2:]
            padded = F.pad(x, (s, s, s, s))
            x = torch.stack([padded[i, :, s - dy : s - dy + H, s - dx : s - dx + W]
                             for i, (dy, dx) in enumerate(shifts.tolist())])
    return x
