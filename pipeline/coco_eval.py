"""COCO box evaluation with pycocotools, once per epoch, over the predictions of every DDP rank.

Each rank adds the images it saw (their COCO records: id, size, annotations) and its detections
with `CocoEvaluator.update`. `compute` gathers both from all ranks (``all_gather_object``),
evaluates once on rank 0 with pycocotools' `COCOeval` (an image seen by two ranks counts once),
and broadcasts the numbers, so every rank returns the same metrics. The ground truth travels
with the samples, so evaluation needs no annotation file next to the shards.

Metrics (pycocotools' 12 summary numbers, first 6; fractions in [0, 1], -1 where the split
has no ground truth of that kind, e.g. no small objects): ``map`` (AP at IoU 0.50:0.95),
``map_50``, ``map_75``, ``map_small``, ``map_medium``, ``map_large``.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["COCO_METRICS", "CocoEvaluator", "coco_evaluate"]

COCO_METRICS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")


def _xyxy_to_xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.detach().float().cpu()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()


def coco_evaluate(images: Sequence[Mapping[str, Any]], detections: Sequence[Mapping[str, Any]],
                  categories: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """pycocotools bbox evaluation of ``detections`` (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).

    ``images``: COCO image records with their ``annotations`` (as the shards store them);
    duplicates (same ``image_id``) count once.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    unique = {int(im["image_id"]): im for im in images}
    gt_images, gt_anns = [], []
    for image_id in sorted(unique):
        im = unique[image_id]
        gt_images.append({"id": image_id, "width": im["width"], "height": im["height"]})
        for a in im["annotations"]:
            # Fresh ids from 1: COCOeval marks "unmatched" with id 0, so a source id 0 would never match.
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": image_id, "category_id": int(a["category_id"]),
                            "bbox": list(a["bbox"]), "area": float(a["area"]), "iscrowd": int(a["iscrowd"])})
    dets = [d for d in detections if int(d["image_id"]) in unique]
    if not gt_images or not dets or not any(not a["iscrowd"] for a in gt_anns):
        # Nothing detected (or nothing to detect): pycocotools cannot load an empty result list.
        return {name: 0.0 if gt_anns else -1.0 for name in COCO_METRICS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        gt = COCO()
        gt.dataset = {"images": gt_images, "annotations": gt_anns, "categories": [dict(c) for c in categories]}
        gt.createIndex()
        dt = gt.loadRes([dict(d) for d in dets])
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(COCO_METRICS, ev.stats[: len(COCO_METRICS)])}


class CocoEvaluator:
    """Collects ground truth and detections over an epoch (on every rank), then evaluates them once.

    ``category_ids[i]`` is the COCO id of detector label ``i + 1`` (label 0 is background).
    """

    def __init__(self, categories: Sequence[Mapping[str, Any]]) -> None:
        self.categories = [dict(c) for c in categories]
        self.category_ids = [int(c["id"]) for c in self.categories]
        self.reset()

    def reset(self) -> None:
        """Forget everything added so far (call at the start of each evaluation epoch)."""
        self.images: list[dict[str, Any]] = []
        self.detections: list[dict[str, Any]] = []

    def update(self, images: Sequence[Mapping[str, Any]], predictions: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Add a batch: COCO image records and per-image ``boxes`` (xyxy, original image pixels), ``scores``, ``labels``."""
        if len(images) != len(predictions):
            raise ValueError(f"{len(images)} images but {len(predictions)} predictions")
        for im, pred in zip(images, predictions):
            self.images.append({"image_id": int(im["image_id"]), "width": int(im["width"]),
                                "height": int(im["height"]), "annotations": list(im["annotations"])})
            labels = pred["labels"].detach().cpu().tolist()
            for box, score, label in zip(_xyxy_to_xywh(pred["boxes"]), pred["scores"].detach().cpu().tolist(), labels):
                if not 1 <= label <= len(self.category_ids):
                    raise ValueError(f"predicted label {label}; expected 1..{len(self.category_ids)} (0 is background)")
                self.detections.append({"image_id": int(im["image_id"]), "category_id": self.category_ids[label - 1],
                                        "bbox": box, "score": float(score)})

    def compute(self) -> dict[str, float]:
        """COCO metrics over everything added on every rank; the same dict on every rank (a collective call)."""
        images, detections = self.images, self.detections
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (images, detections))
            images = [im for ims, _ in gathered for im in ims]
            detections = [d for _, dets in gathered for d in dets]
        result = [coco_evaluate(images, detections, self.categories) if not distributed or dist.get_rank() == 0 else None]
        if distributed:
            dist.broadcast_object_list(result, src=0)
        return dict(result[0])
