"""A synthetic COCO-format detection set: circles, squares and triangles on textured backgrounds.

`write_shapes(dst)` writes what a COCO download looks like::

    dst/train2017/000000000001.jpg ...       dst/val2017/...
    dst/annotations/instances_train2017.json dst/annotations/instances_val2017.json

so `condconv data coco-to-wds` converts it like the real thing. It exercises what COCO has:
non-contiguous category ids (1, 3, 7), several objects per image, empty images, and crowd
regions (a cluster of small circles annotated by one ``iscrowd=1`` box, which COCO evaluation
treats as an ignore region). Objects have random colours, so the class is the shape. Seeded:
the same arguments give the same files.
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPE_CATEGORIES", "write_shapes"]

# Non-contiguous ids, as COCO's (1..90 with gaps): the converter and evaluation must map them.
SHAPE_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
]
_EMPTY_FRACTION = 0.05
_CROWD_FRACTION = 0.1
_JPEG_QUALITY = 90


def _background(rng: random.Random, size: int) -> Image.Image:
    """Noise over a colour gradient with random stripes: texture the detector must learn to ignore."""
    nrng = np.random.default_rng(rng.randrange(2**32))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([rng.uniform(40, 200) + rng.uniform(-50, 50) * (xx if c % 2 else yy) for c in range(3)], -1)
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 20)
    stripes = 25 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * size * 2 * math.pi / period)
    img = base + stripes[..., None] + nrng.normal(0, 18, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))  # type: ignore[return-value]


def _draw(draw: ImageDraw.ImageDraw, shape: str, x0: float, y0: float, s: float, colour: tuple) -> None:
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + s, y0 + s], fill=colour)
    elif shape == "square":
        draw.rectangle([x0, y0, x0 + s, y0 + s], fill=colour)
    else:
        draw.polygon([(x0 + s / 2, y0), (x0 + s, y0 + s), (x0, y0 + s)], fill=colour)


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _image(rng: random.Random, size: int, max_objects: int) -> tuple[Image.Image, list[dict[str, Any]]]:
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    anns: list[dict[str, Any]] = []
    if rng.random() < _EMPTY_FRACTION:
        return img, anns
    if rng.random() < _CROWD_FRACTION:
        # A crowd: several small circles in one region, annotated once with iscrowd=1.
        s = size * 0.08
        cx, cy = rng.uniform(0, size * 0.6), rng.uniform(0, size * 0.6)
        for _ in range(rng.randint(4, 6)):
            _draw(draw, "circle", cx + rng.uniform(0, size * 0.25), cy + rng.uniform(0, size * 0.25), s, _colour(rng))
        box = [cx, cy, size * 0.25 + s, size * 0.25 + s]
        anns.append({"category_id": 1, "bbox": box, "iscrowd": 1})
    for _ in range(rng.randint(1, max_objects)):
        s = rng.uniform(0.15, 0.45) * size
        x0, y0 = rng.uniform(0, size - s), rng.uniform(0, size - s)
        box = [x0, y0, s, s]
        if any(_iou(box, a["bbox"]) > 0.0 for a in anns):
            continue  # no overlaps: every object stays fully visible, so its box is exact
        cat = rng.choice(SHAPE_CATEGORIES)
        _draw(draw, cat["name"], x0, y0, s, _colour(rng))
        anns.append({"category_id": cat["id"], "bbox": box, "iscrowd": 0})
    return img, anns


def write_shapes(
    dst: str | os.PathLike,
    num_train: int = 400,
    num_val: int = 100,
    size: int = 128,
    max_objects: int = 3,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the shapes set as COCO (images + ``annotations/instances_<split>.json``); returns images per split."""
    for name, value in (("num_train", num_train), ("num_val", num_val), ("size", size), ("max_objects", max_objects)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}; expected an int >= 1")
    if size < 32:
        raise ValueError(f"size={size}; expected >= 32 pixels (smaller shapes are not drawable)")
    root = Path(dst)
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise ValueError(f"destination {root} is not empty; pass overwrite=True (--overwrite) to write into it")
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    image_id = ann_id = 0
    for split, n in (("train2017", num_train), ("val2017", num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for _ in range(n):
            image_id += 1
            img, anns = _image(rng, size, max_objects)
            file_name = f"{image_id:012d}.jpg"
            img.save(root / split / file_name, quality=_JPEG_QUALITY)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for a in anns:
                ann_id += 1
                bbox = [round(v, 2) for v in a["bbox"]]
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": a["category_id"],
                                    "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": a["iscrowd"]})
        (root / "annotations").mkdir(exist_ok=True)
        coco = {"info": {"description": "condconv synthetic shapes", "seed": seed}, "images": images,
                "annotations": annotations, "categories": SHAPE_CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        counts[split] = n
    return counts
