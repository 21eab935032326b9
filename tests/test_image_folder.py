"""Local image folders as a ViT data source (data/image_folder.py, data/images.py): class subfolders or
none, images of mixed sizes and modes, a VOC folder's JPEGImages; and a ViT eval reading one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data.image_folder import list_folder, read_image
from data.images import ImageDataConfig, load_images

pytestmark = pytest.mark.usefixtures("single_thread")


def img(w, h, value, mode="RGB"):
    return Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).convert(mode)


def test_modes_read_as_rgb_or_grey(tmp_path):
    img(5, 4, 200, "L").save(tmp_path / "l.png")
    img(5, 4, 102, "P").save(tmp_path / "p.png")  # a web-palette colour: exact
    rgba = Image.new("RGBA", (3, 2), (10, 20, 30, 0))  # fully transparent: shown as white
    rgba.save(tmp_path / "a.png")
    Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16)).save(tmp_path / "i16.png")
    assert read_image(tmp_path / "l.png").shape == (4, 5, 3) and (read_image(tmp_path / "l.png") == 200).all()
    assert (read_image(tmp_path / "p.png") == 102).all()
    assert (read_image(tmp_path / "a.png") == 255).all()
    assert read_image(tmp_path / "i16.png", channels=1).shape == (2, 2, 1)
    assert (read_image(tmp_path / "i16.png", channels=1) == 255).all()
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg cannot be read"):
        read_image(tmp_path / "bad.jpg")


def test_class_subfolders_of_mixed_sizes(tmp_path):
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / cls).mkdir()
        for i, (w, h) in enumerate(((20, 10), (7, 9), (16, 16))):
            img(w, h, value, "L" if i == 1 else "RGB").save(tmp_path / cls / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    paths, labels, classes = list_folder(tmp_path)
    assert classes == ["cat", "dog"] and labels == [0, 0, 0, 1, 1, 1] and len(paths) == 6
    s = load_images(ImageDataConfig(source=str(tmp_path), folder_size=12, val_fraction=0.34))
    x = torch.cat([s.train_x, s.val_x])
    y = torch.cat([s.train_y, s.val_y])
    assert x.shape[1:] == (3, 12, 12) and len(x) == 6  # mixed sizes resized, RGB because some are
    for xi, yi in zip(x, y):  # a flat image stays flat through the resize: its class's value
        assert torch.allclose(xi, torch.full_like(xi, float(yi)), atol=1e-6)


def test_flat_folder_of_greyscale_is_one_class_one_channel(tmp_path):
    for i in range(4):
        img(8 + i, 8, 50 * i, "L").save(tmp_path / f"{i}.jpg")
    s = load_images(ImageDataConfig(source=str(tmp_path), folder_size=8, val_fraction=0.25))
    assert s.train_x.shape[1:] == (1, 8, 8) and set(torch.cat([s.train_y, s.val_y]).tolist()) == {0}


def test_a_folder_without_images_is_left_to_datasets_and_refused_in_one_line(tmp_path):
    (tmp_path / "data.txt").write_text("no images here")
    with pytest.raises(ValueError, match="has columns \\[.text.\\]; set data.image_field"):
        load_images(ImageDataConfig(source=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="holds no images"):
        list_folder(tmp_path)


def test_vit_artifacts_on_a_voc_folder_of_mixed_sizes(tmp_path, capsys):
    """A pretrained ViT's norms on a VOC folder: every ViT eval takes a folder through --data."""
    from eval import vit_artifacts
    from tests.test_lost_boxes import tiny_dinov2, write_voc

    tiny_dinov2(tmp_path / "dino")
    voc = write_voc(tmp_path / "voc", {f"i{k}": (img(20 + 7 * k, 30, 40 * k), f"i{k}.jpg", [(1, 1, 5, 5, 0)])
                                       for k in range(5)})
    (r,) = vit_artifacts.main(["--ckpt", f"hf:{tmp_path / 'dino'}", "--data", str(voc), "--n-maps", "1"])
    assert r.n_images == 1 and len(r.layers) == 2  # 5 images, val_fraction 0.2
    assert "outlier % per block" in capsys.readouterr().out
