"""ImageNet-style train/val transforms (torchvision.transforms.v2): RGB PIL image -> normalised float tensor."""
from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TRAIN_AUGMENTS", "default_val_resize", "train_transform", "val_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_AUGMENTS = ("standard", "none", "randaugment", "autoaugment")


def default_val_resize(image_size: int) -> int:
    """The resize before the val center crop: `image_size / 0.875` (256 for 224, the usual crop ratio)."""
    return int(math.floor(image_size / 0.875))


def train_transform(image_size: int, augment: str = "standard", val_resize: int | None = None) -> v2.Compose:
    """Training transform.

    `standard`: RandomResizedCrop + horizontal flip; `randaugment` / `autoaugment` add RandAugment /
    AutoAugment (ImageNet policy) after them, as in the CondConv/EfficientNet recipes; `none`: the
    val transform (resize to `val_resize` + center crop), so train and val images are framed alike.
    """
    if augment not in TRAIN_AUGMENTS:
        raise ValueError(f"train_augment must be one of {list(TRAIN_AUGMENTS)}, got {augment!r}")
    if augment == "none":
        return val_transform(image_size, val_resize)
    # uint8 tensors first: the geometric and policy ops are fastest (and exact) on uint8.
    ops: list[v2.Transform] = [v2.ToImage(), v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    if augment == "randaugment":
        ops.append(v2.RandAugment())
    elif augment == "autoaugment":
        ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    ops += _to_normalized_tensor()
    return v2.Compose(ops)


def val_transform(image_size: int, resize: int | None = None) -> v2.Compose:
    """Validation transform: Resize(shorter side to `resize`) + CenterCrop(image_size) + normalise."""
    resize = default_val_resize(image_size) if resize is None else resize
    if resize < image_size:
        raise ValueError(f"val_resize ({resize}) must be >= image_size ({image_size}) to center-crop")
    return v2.Compose(
        [v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *_to_normalized_tensor()]
    )


def _to_normalized_tensor() -> list[v2.Transform]:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),  # plain tensors collate and pickle across workers without tv_tensor wrappers
    ]
