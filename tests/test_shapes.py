"""The synthetic shapes source (data/shapes.py): deterministic draws, masks equal to the drawn objects."""
from __future__ import annotations

import pytest
import torch

from data.images import ImageDataConfig, load_images
from data.shapes import boxes_from_mask, make_shapes, shape_mask


def test_draws_are_a_function_of_seed_split_and_index():
    x, y, m = make_shapes(12, "train", seed=3)
    x2, y2, m2 = make_shapes(5, "train", seed=3)
    assert torch.equal(x[:5], x2) and torch.equal(y[:5], y2) and torch.equal(m[:5], m2)
    xv, _, _ = make_shapes(5, "val", seed=3)
    xs, _, _ = make_shapes(5, "train", seed=4)
    assert not torch.equal(x[:5], xv) and not torch.equal(x[:5], xs)
    assert x.shape == (12, 1, 32, 32) and m.shape == (12, 32, 32) and 0 <= x.min() and x.max() <= 1


def test_masks_are_exactly_the_objects_and_labels_count_them():
    x, y, m = make_shapes(40, "val", seed=0, background="flat", label="count", max_objects=4)
    for img, label, mask in zip(x[:, 0], y, m):
        background = img[0, 0] if mask[0, 0] == 0 else img[mask == 0][0]
        # on a flat background every pixel that differs from it is an object pixel, and only those
        assert torch.equal(img != background, mask > 0)
        n = int(mask.max())
        assert label == n - 1 and len(boxes_from_mask(mask)) == n
        for k in range(1, n + 1):  # one brightness per object, well above the background
            vals = img[mask == k]
            assert vals.min() == vals.max() and vals.min() >= background + 0.3 - 1e-6
    assert (m > 0).float().mean() < 0.3  # mostly background


def test_kinds_label_names_the_shapes_drawn():
    x, y, m = make_shapes(30, "train", seed=1, background="flat", label="kinds")
    for img, label, mask in zip(x[:, 0], y, m):
        kinds = set()
        for k in range(1, int(mask.max()) + 1):
            obj = mask == k
            y0, x0, y1, x1 = boxes_from_mask(obj.long())[0]
            r, cy, cx = (y1 - y0) // 2, (y0 + y1) // 2, (x0 + x1) // 2
            match = [i for i, kind in enumerate(("square", "disc", "triangle"))
                     if torch.equal(torch.from_numpy(shape_mask(kind, cy, cx, r, 32)), obj)]
            assert len(match) == 1, "each object is exactly one of the three shapes"
            kinds.add(match[0])
        assert label == sum(1 << k for k in kinds) - 1


def test_shapes_source_through_the_image_loader():
    cfg = ImageDataConfig(source="shapes", shapes_train=64, shapes_val=16, augment_shift=2)
    images = load_images(cfg)
    assert images.shape == (1, 32, 32) and images.n_classes == 7
    assert images.train_masks.shape == (64, 32, 32) and images.val_masks.shape == (16, 32, 32)
    a = images.loader("train", 8, seed=5, cfg=cfg).get_batch(3)
    b = load_images(cfg).loader("train", 8, seed=5, cfg=cfg).get_batch(3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("override, match", [
    (dict(shapes_background="stripes"), "shapes_background"),
    (dict(shapes_size=8), "shapes_size"),
    (dict(shapes_max_objects=0), "shapes_max_objects"),
])
def test_bad_shapes_config_is_one_clear_error(override, match):
    with pytest.raises(ValueError, match=match):
        ImageDataConfig(source="shapes", **override).validate()
