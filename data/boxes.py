"""Images with object boxes, for unsupervised object discovery (LOST's CorLoc): Pascal VOC or COCO.

- **Pascal VOC layout**: a folder with JPEGImages/<id>.jpg, Annotations/<id>.xml and
  ImageSets/Main/<split>.txt (one id a line; VOC2007's and VOC2012's `trainval` are what LOST
  is scored on). Without ImageSets/Main/<split>.txt every Annotations/*.xml is used.
- **An HF dataset with boxes** (`datasets.load_dataset(name)`, the hub's object-detection layout:
  an `image` column and an `objects` column with a `bbox` list per record, in `box_format`
  xywh (COCO's) or xyxy pixels; a local folder of images with a metadata.jsonl in that layout
  loads the same way).
- **COCO**: an instances json (`images`, `annotations` with `bbox` = [x, y, w, h]); the image
  files are found by `file_name` under the json's folder, its `images/` or its parent
  (or `image_root`). LOST's COCO20k is train2014 restricted to its 19,817 file names.

Boxes are read as LOST's code reads them (valeoai/LOST, datasets.py), in continuous pixel
coordinates (x0, y0, x1, y1): VOC's 1-based inclusive corners become (xmin - 1, ymin - 1, xmax,
ymax); COCO's [x, y, w, h] becomes (x, y, x + w, y + h) rounded to integers, crowd boxes
left out. Every object counts, difficult and truncated ones too (LOST's default); `no_hard`
drops them and the images left without any (LOST's `--no_hard`). A VOC folder's
SegmentationObject/<id>.png, where present, is the image's instance mask (VOC's 255 border: -1).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class BoxedImage:
    name: str
    path: Path
    boxes: np.ndarray  # (K, 4) float (x0, y0, x1, y1), continuous pixel coordinates; K may be 0
    mask_path: Path | None = None  # VOC SegmentationObject/<id>.png when the folder has it
    image: object = None  # a callable giving the PIL image (an HF dataset's record) instead of `path`

    def source(self):
        """What data/image_folder.read_image reads: the file, or the dataset's PIL image."""
        return self.path if self.image is None else self.image()


def is_voc(path) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / "Annotations").is_dir() and (p / "JPEGImages").is_dir()


def is_coco(path) -> bool:
    p = Path(path).expanduser()
    return p.is_file() and p.suffix.lower() == ".json"


def is_boxed(source) -> bool:
    """Whether `source` (a data.source string) names a VOC folder or a COCO json on disk."""
    return isinstance(source, str) and (is_voc(source) or is_coco(source))


def _voc_ids(root: Path, split: str | None) -> list[str]:
    listing = root / "ImageSets" / "Main" / f"{split or 'trainval'}.txt"
    if listing.is_file():
        return [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if split is not None:
        raise FileNotFoundError(f"{listing} does not exist; name a split that {root / 'ImageSets' / 'Main'} has, "
                                "or leave --split out to use every annotation")
    return sorted(p.stem for p in (root / "Annotations").glob("*.xml"))


def read_voc(root, split: str | None = None, no_hard: bool = False) -> list[BoxedImage]:
    root = Path(root).expanduser()
    out = []
    for i in _voc_ids(root, split):
        xml = root / "Annotations" / f"{i}.xml"
        if not xml.is_file():
            raise FileNotFoundError(f"{xml} does not exist: the split lists {i!r} without its annotation")
        ann = ET.parse(xml).getroot()
        path = root / "JPEGImages" / f"{i}.jpg"
        if not path.is_file():
            path = root / "JPEGImages" / (ann.findtext("filename") or f"{i}.jpg")
        if not path.is_file():
            raise FileNotFoundError(f"{root / 'JPEGImages'} has no image for {i!r}")
        boxes = []
        for obj in ann.iter("object"):
            hard = obj.findtext("difficult", "0").strip() == "1" or obj.findtext("truncated", "0").strip() == "1"
            if no_hard and hard:
                continue
            b = obj.find("bndbox")
            x0, y0, x1, y1 = (int(float(b.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append((x0 - 1, y0 - 1, x1, y1))  # 1-based inclusive -> continuous
        if no_hard and not boxes:
            continue
        mask = root / "SegmentationObject" / f"{i}.png"
        out.append(BoxedImage(i, path, np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                              mask if mask.is_file() else None))
    return out


def _coco_root(json_path: Path, image_root, first: str) -> Path:
    candidates = [Path(image_root).expanduser()] if image_root else [json_path.parent, json_path.parent / "images",
                                                                      json_path.parent.parent]
    for root in candidates:
        if (root / first).is_file():
            return root
    raise FileNotFoundError(f"the image {first!r} of {json_path} is in none of {', '.join(map(str, candidates))}; "
                            "give the folder of the images with --image-root")


def read_coco(json_path, image_root=None) -> list[BoxedImage]:
    json_path = Path(json_path).expanduser()
    try:
        data = json.loads(json_path.read_text())
        images, anns = data["images"], data.get("annotations", [])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{json_path} is not a COCO instances json (images, annotations): {e}") from None
    if not images:
        raise ValueError(f"{json_path} lists no images")
    root = _coco_root(json_path, image_root, images[0]["file_name"])
    boxes: dict = {im["id"]: [] for im in images}
    for a in anns:
        if a.get("iscrowd", 0) == 1 or a["image_id"] not in boxes:
            continue
        x, y, w, h = a["bbox"]
        boxes[a["image_id"]].append([int(round(v)) for v in (x, y, x + w, y + h)])
    return [BoxedImage(str(im["id"]), root / im["file_name"],
                       np.asarray(boxes[im["id"]], dtype=np.float64).reshape(-1, 4)) for im in images]


def read_mask(path) -> np.ndarray:
    """A VOC SegmentationObject PNG -> (H, W) int: 0 background, 1.. instances, -1 the void border (255)."""
    from PIL import Image

    with Image.open(path) as im:
        m = np.array(im).astype(np.int64)  # palette indices are the instance ids
    m[m == 255] = -1
    return m


BOX_FORMATS = ("xywh", "xyxy")


def read_hf_boxes(name: str, split: str | None = None, box_format: str = "xywh", hub_config: str | None = None,
                  image_field: str = "image", objects_field: str = "objects") -> list[BoxedImage]:
    """The images and boxes of an HF dataset in the hub's object-detection layout (module docstring)."""
    from datasets import load_dataset

    if box_format not in BOX_FORMATS:
        raise ValueError(f"--box-format must be one of {list(BOX_FORMATS)}, got {box_format!r}")
    try:
        ds = load_dataset(name, hub_config, split=split or "train")
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; the user needs the name and the cause
        raise ValueError(f"{name!r} could not be loaded as an HF dataset with boxes ({e})") from None
    if image_field not in ds.column_names or objects_field not in ds.column_names:
        raise ValueError(f"{name} has columns {ds.column_names}; a dataset with boxes needs {image_field!r} and "
                         f"{objects_field!r} (with a 'bbox' list)")
    out = []
    for i, objects in enumerate(ds[objects_field]):
        b = np.asarray(objects["bbox"] if objects else [], dtype=np.float64).reshape(-1, 4)
        if box_format == "xywh":
            b[:, 2:] += b[:, :2]
        out.append(BoxedImage(str(i), Path(f"{name}[{i}]"), np.round(b), image=lambda i=i: ds[i][image_field]))
    return out


def read_boxed(source, split: str | None = None, image_root=None, no_hard: bool = False) -> list[BoxedImage]:
    """The images and boxes of a VOC folder or a COCO json (module docstring)."""
    if is_voc(source):
        return read_voc(source, split, no_hard)
    if is_coco(source):
        return read_coco(source, image_root)
    raise FileNotFoundError(f"{source} is neither a Pascal VOC folder (JPEGImages/, Annotations/) nor a COCO json")
