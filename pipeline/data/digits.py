"""The demo dataset: scikit-learn's bundled handwritten digits written as an ImageNet-style folder.

`sklearn.datasets.load_digits` ships with scikit-learn (no download): 1797 real 8x8 grayscale
scans with 17 grey levels, 10 classes. They are written as `DST/{train,val}/<digit>/<index>.png`
(RGB, upscaled), with a seeded stratified split, so the demo runs the same converter and data
module as ImageNet.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_digits"]

_FORMATS = {"png": "PNG", "jpg": "JPEG"}


def write_digits(
    dst: str | os.PathLike,
    *,
    size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    image_format: str = "png",
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the digits as `dst/train/<d>/<i>.<ext>` and `dst/val/<d>/<i>.<ext>`; return split sizes.

    Args:
        dst: output folder (created; must be empty unless `overwrite`).
        size: side of the square output images (upscaled bicubically from 8x8).
        val_fraction: fraction of each class held out for `val` (stratified).
        seed: seed of the split; the same seed always gives the same split.
        image_format: `png` (lossless) or `jpg`.
        overwrite: write into a non-empty `dst` (existing files with the same names are replaced).
    """
    if image_format not in _FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_FORMATS)}, got {image_format!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (the digits are 8x8), got {size!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"destination {dst} is not empty; pass --overwrite to write into it")

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16 (16 = ink); scale to 0..255 with ink bright, as in the source scans.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target
    indices = np.arange(len(labels))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, stratify=labels, random_state=seed)
    for split, split_idx in (("train", train_idx), ("val", val_idx)):
        for label in range(10):
            (dst / split / str(label)).mkdir(parents=True, exist_ok=True)
        for i in sorted(split_idx.tolist()):
            img = Image.fromarray(images[i]).resize((size, size), Image.Resampling.BICUBIC)
            img.convert("RGB").save(dst / split / str(labels[i]) / f"{i:04d}.{image_format}", _FORMATS[image_format])
    return {"train": len(train_idx), "val": len(val_idx)}
