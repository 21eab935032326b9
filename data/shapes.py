"""Synthetic shapes with dense labels: objects on an uninformative background, drawn from a seed.

Each image is `size` x `size`, one channel: a flat grey background (plus Gaussian noise with
`background="noise"`) and 1..max_objects non-overlapping objects, each a square, a disc or an
upright triangle of random size, place and brightness. With a 4-pixel patch a 32 x 32 image is
an 8 x 8 grid of 64 patches, most of them background: redundant tokens, as in natural images.

The image-level label needs every object, i.e. global information:
- `kinds`: which of the three shapes occur (a non-empty subset, 7 classes, id = bitmask - 1);
- `count`: how many objects there are (max_objects classes, id = count - 1).

Per-pixel masks give the instance id (0 = background, k = the k-th object): object / background
for a patch probe, one box per object for object discovery (CorLoc).

Image i of a split is drawn by its own generator seeded by (seed, split, i): the same image
whatever the number of images asked for, and the two splits are independent draws.
"""
from __future__ import annotations

import numpy as np
import torch

from .loader import seed_from_key

SHAPES = ("square", "disc", "triangle")
BACKGROUNDS = ("flat", "noise")
LABELS = ("kinds", "count")
NOISE_STD = 0.08  # background noise; objects stand >= 0.3 above the brightest background level
MIN_RADIUS = 3  # a 7-pixel object: at least about 2x2 patches of 4 pixels, findable at patch level


def n_classes(label: str, max_objects: int) -> int:
    return 2 ** len(SHAPES) - 1 if label == "kinds" else max_objects


def shape_mask(kind: str, cy: int, cx: int, r: int, size: int) -> np.ndarray:
    """(size, size) bool: the pixels of one shape of half-extent r centred at (cy, cx)."""
    y, x = np.mgrid[:size, :size]
    dy, dx = y - cy, x - cx
    if kind == "square":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if kind == "disc":
        return dy**2 + dx**2 <= r * r + r  # + r: rounder at small radii
    # triangle, apex up: half-width grows from 0 at the top row to r at the bottom row
    return (dy >= -r) & (dy <= r) & (2 * np.abs(dx) <= dy + r)


def draw_image(rng: np.random.Generator, size: int, max_objects: int, background: str):
    """One image (size, size) float32 in [0, 1], its instance mask (size, size) int64 and kinds."""
    level = rng.uniform(0.0, 0.3)
    img = np.full((size, size), level, dtype=np.float32)
    if background == "noise":
        img += rng.normal(0.0, NOISE_STD, (size, size)).astype(np.float32)
    mask = np.zeros((size, size), dtype=np.int64)
    n_objects = int(rng.integers(1, max_objects + 1))
    max_r = max(MIN_RADIUS, size // 6)
    kinds, boxes = [], []
    while len(kinds) < n_objects:  # rejection sampling of non-overlapping boxes (1 px apart)
        for _ in range(100):
            r = int(rng.integers(MIN_RADIUS, max_r + 1))
            cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
            box = (cy - r - 1, cx - r - 1, cy + r + 1, cx + r + 1)
            if all(box[0] > b[2] or box[2] < b[0] or box[1] > b[3] or box[3] < b[1] for b in boxes):
                break
        else:  # no room left: an image with fewer objects is still a valid draw; start it again
            return draw_image(rng, size, max_objects, background)
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        m = shape_mask(kind, cy, cx, r, size)
        img[m] = rng.uniform(level + 0.3, 1.0)
        kinds.append(kind)
        boxes.append(box)
        mask[m] = len(kinds)
    return np.clip(img, 0.0, 1.0), mask, kinds


def make_shapes(n: int, split: str, seed: int, size: int = 32, max_objects: int = 3,
                background: str = "noise", label: str = "kinds"):
    """n images (n, 1, size, size) float in [0, 1], labels (n,) long, instance masks (n, size, size) long."""
    if background not in BACKGROUNDS:
        raise ValueError(f"data.shapes_background={background!r} is not one of {list(BACKGROUNDS)}")
    if label not in LABELS:
        raise ValueError(f"data.shapes_label={label!r} is not one of {list(LABELS)}")
    if size < 16 or max_objects < 1 or max_objects > 8:
        raise ValueError(f"shapes need data.shapes_size >= 16 and 1 <= data.shapes_max_objects <= 8, "
                         f"got {size} and {max_objects}")
    images, masks, labels = [], [], []
    for i in range(n):
        rng = np.random.default_rng(seed_from_key(f"shapes/{seed}/{split}/{i}"))
        img, mask, kinds = draw_image(rng, size, max_objects, background)
        images.append(img)
        masks.append(mask)
        if label == "kinds":
            labels.append(sum(1 << SHAPES.index(k) for k in set(kinds)) - 1)
        else:
            labels.append(len(kinds) - 1)
    return (torch.from_numpy(np.stack(images)).unsqueeze(1), torch.tensor(labels, dtype=torch.long),
            torch.from_numpy(np.stack(masks)))


def boxes_from_mask(mask: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(H, W) instance mask -> one (y0, x0, y1, x1) box per object, inclusive pixel bounds."""
    out = []
    for k in range(1, int(mask.max()) + 1):
        ys, xs = torch.nonzero(mask == k, as_tuple=True)
        if len(ys):
            out.append((int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())))
    return out
