"""SSD training augmentation and the eval resize (torchvision.transforms.v2 on `tv_tensors.BoundingBoxes`).

Train (``ssd``, as torchvision's SSD reference): photometric distortion, zoom-out (expand onto a
mean-coloured canvas), IoU crop, horizontal flip; then resize to the square input and drop boxes
that lost their area. ``none``: the eval transform. Both end with float images in [0, 1] (the
detector normalises) and xyxy boxes in input pixels.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["DETECTION_AUGMENTS", "detection_train_transform", "detection_eval_transform", "make_target"]

DETECTION_AUGMENTS = ("ssd", "none")
_MEAN_FILL = (124, 116, 104)  # ImageNet mean in 0..255: the zoom-out canvas


class _IfBoxes(v2.Transform):
    """Apply ``transform`` only to samples with at least one box (IoU crop has nothing to aim at otherwise)."""

    def __init__(self, transform: v2.Transform) -> None:
        super().__init__()
        self.inner = transform

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        boxes = sample[1]["boxes"]
        return self.inner(sample) if boxes.shape[0] > 0 else sample


def detection_train_transform(image_size: int, augment: str = "ssd") -> Callable[[Any, dict], tuple]:
    """``(PIL image, {"boxes": BoundingBoxes, "labels"}) -> (float image [3, S, S], target)``."""
    if augment not in DETECTION_AUGMENTS:
        raise ValueError(f"augment={augment!r}; expected one of {list(DETECTION_AUGMENTS)}")
    if augment == "none":
        return detection_eval_transform(image_size)
    return v2.Compose([
        v2.ToImage(),
        v2.RandomPhotometricDistort(p=0.5),
        v2.RandomZoomOut(fill={tv_tensors.Image: _MEAN_FILL, "others": 0}, side_range=(1.0, 2.0), p=0.5),
        _IfBoxes(v2.RandomIoUCrop()),
        v2.RandomHorizontalFlip(p=0.5),
        v2.Resize((image_size, image_size), antialias=True),
        v2.SanitizeBoundingBoxes(min_size=1.0),
        v2.ToDtype(torch.float32, scale=True),
    ])


def detection_eval_transform(image_size: int) -> v2.Compose:
    """Resize to the square input (no crop, so every box stays), float in [0, 1]."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize((image_size, image_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
    ])


def make_target(meta: dict[str, Any], label_of: dict[int, int], canvas: tuple[int, int]) -> dict[str, Any]:
    """Training target of a sample: non-crowd boxes (xyxy ``BoundingBoxes``) and labels ``1..K``.

    Crowd regions are left out of training, as torchvision's COCO reference does.
    """
    anns = [a for a in meta["annotations"] if not a["iscrowd"]]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas),
        "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
    }
