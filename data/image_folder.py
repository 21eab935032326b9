"""Images from a local folder, of any size and mode, with or without class subfolders.

A folder whose subfolders hold the images is a classification set (label = the subfolder's index
in sorted order, as torchvision's ImageFolder); a folder holding the images itself is one class
(label 0). A Pascal VOC folder (JPEGImages/ beside Annotations/) gives its JPEGImages, label 0.
Every file that PIL opens counts (.jpg, .jpeg, .png, .bmp, .gif, .tif, .tiff, .webp), in sorted
order. Images are read as RGB whatever their mode (greyscale, palette, RGBA, CMYK, 16-bit); a
folder where every image is greyscale is read as one channel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def is_image_folder(path) -> bool:
    """Whether `path` is a folder of images or of class subfolders of images (anything else, e.g. a clone
    of a hub dataset of parquet files, is left to `datasets.load_dataset`)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    if (p / "JPEGImages").is_dir() and (p / "Annotations").is_dir():
        return True
    return bool(image_files(p)) or any(d.is_dir() and image_files(d) for d in p.iterdir())


def list_folder(folder) -> tuple[list[Path], list[int], list[str]]:
    """(image paths, labels, class names) of an image folder (module docstring)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    if (folder / "JPEGImages").is_dir() and (folder / "Annotations").is_dir():
        folder = folder / "JPEGImages"
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and image_files(p))
    if classes:
        paths, labels = [], []
        for i, name in enumerate(classes):
            files = image_files(folder / name)
            paths += files
            labels += [i] * len(files)
    else:
        paths, classes = image_files(folder), [folder.name]
        labels = [0] * len(paths)
    if not paths:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no subfolders of them")
    return paths, labels, classes


def image_mode(path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return im.mode


def read_image(path, channels: int = 3) -> np.ndarray:
    """(H, W, channels) uint8: RGB for 3 channels, luminance for 1, whatever the file's mode (`path`
    may also be a PIL image)."""
    from PIL import Image, ImageOps

    try:
        with (path if isinstance(path, Image.Image) else Image.open(path)) as im:
            im = ImageOps.exif_transpose(im)  # the orientation a viewer shows
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float greyscale: scale to 8 bits
                a = np.asarray(im, dtype=np.float64)
                hi = a.max() if a.max() > 0 else 1.0
                im = Image.fromarray((a / hi * 255).round().astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                # transparent pixels over white, as a viewer shows them (their stored colour is arbitrary)
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            arr = np.array(im.convert("RGB" if channels == 3 else "L"))
    except OSError as e:
        raise ValueError(f"{path} cannot be read as an image ({e}); remove it or convert it") from None
    return arr if arr.ndim == 3 else arr[..., None]


def folder_channels(paths) -> int:
    """1 when every image is greyscale, else 3."""
    return 1 if all(image_mode(p) in GREY_MODES for p in paths) else 3
