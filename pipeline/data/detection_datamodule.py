"""`DetectionDataModule`: SSD batches from COCO webdataset shards (`condconv data coco-to-wds`).

Batches are ``(images float32 [B, 3, S, S] in [0, 1], targets, records)``: ``targets[i]`` has
``boxes`` (xyxy, input pixels; crowd boxes left out) and ``labels`` (``1..K``, label ``i + 1`` =
``categories[i]``); ``records[i]`` is the image's COCO record from the shard (``image_id``,
``width``, ``height``, ``annotations`` with crowd ones), which evaluation uses as ground truth.

Sample distribution is `ShardDataModule`'s (the same `_ShardStream` logic): train, an endless
reshuffled stream cut to the same number of full batches on every rank; val, every image
exactly once across ranks and workers.
"""
from __future__ import annotations

import itertools
import json
import logging
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader

from pipeline.data.coco_wds import CocoManifest, read_coco_manifest
from pipeline.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, SkipCounter, decode_image
from pipeline.data.detection_transforms import (
    DETECTION_AUGMENTS,
    detection_eval_transform,
    detection_train_transform,
    make_target,
)
from pipeline.data.manifest import join_location
from pipeline.data.ranks import rank_and_world_size
from pipeline.data.shard_datamodule import _EpochDataLoader, _ShardStream, train_batches_per_rank

__all__ = ["DetectionDataModule"]

log = logging.getLogger(__name__)
_MAX_SKIP_WARNINGS = 20


def _plain(target: dict) -> dict:
    # torchvision's SSD wants plain tensors; BoundingBoxes would carry its metadata into the loss.
    return {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]}


class _DetectionStream(_ShardStream):
    """`_ShardStream` with detection samples: image + COCO json in, ``(images, targets, records)`` batches out.

    The shard reading, shuffling, rank/worker assignment and batching are `_ShardStream`'s; its
    batches pair images with integer labels, so each decoded sample passes a ticket number as its
    "label" and its target and record wait in ``_pending`` (in the same worker) until its batch
    comes out.
    """

    def __init__(self, *args: Any, label_of: dict[int, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label_of = label_of
        self._pending: dict[int, tuple[dict, dict]] = {}
        self._tickets = itertools.count()

    def _decode(self, samples: Iterator[dict]) -> Iterator[tuple[torch.Tensor, int]]:
        for sample in samples:
            try:
                ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                if ext is None:
                    raise ImageDecodeError(f"no image, has {sorted(sample)}")
                record = json.loads(sample["json"])
                image = decode_image(sample[ext])
                target = make_target(record, self.label_of, (image.height, image.width))
            except (ImageDecodeError, KeyError, ValueError) as err:
                self.skip_counter.increment()
                self._skip_warnings += 1
                if self._skip_warnings <= _MAX_SKIP_WARNINGS:
                    log.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), err)
                continue
            image, target = self.transform(image, target)
            ticket = next(self._tickets)
            self._pending[ticket] = (target, record)
            yield image, ticket

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list, list]]:
        self._pending.clear()
        for images, tickets in super().__iter__():
            items = [self._pending.pop(int(t)) for t in tickets]
            yield images, [_plain(t) for t, _ in items], [r for _, r in items]


class DetectionDataModule(L.LightningDataModule):
    """SSD train/val batches from detection shards + ``manifest.json`` (format ``condconv-coco-wds/1``).

    Args:
        data_dir: local directory, URL prefix or ``{}`` template holding the shards (as `ShardDataModule`).
        batch_size: per-rank batch size.
        num_workers: DataLoader worker processes per rank.
        image_size: side of the square detector input (SSD300: 300).
        train_augment: ``ssd`` (photometric distortion, zoom-out, IoU crop, flip) or ``none``.
        train_split / val_split: split names in the manifest; null: the one starting with
            ``train`` / ``val`` (``train2017``, ``val2017``).
        shuffle_buffer: train samples held in the shuffle buffer per worker.
        seed: seed of the shard and sample shuffles.
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 32,
        num_workers: int = 2,
        image_size: int = 300,
        train_augment: str = "ssd",
        train_split: str | None = None,
        val_split: str | None = None,
        shuffle_buffer: int = 500,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, lowest in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                    ("image_size", image_size, 32), ("shuffle_buffer", shuffle_buffer, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")
        if train_augment not in DETECTION_AUGMENTS:
            raise ValueError(f"train_augment must be one of {list(DETECTION_AUGMENTS)}, got {train_augment!r}")
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.train_augment, self.shuffle_buffer, self.seed = train_augment, shuffle_buffer, seed
        try:  # eagerly: the model checks num_classes before any loader exists
            self._manifest = read_coco_manifest(self.data_dir)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"data_dir={self.data_dir!r}: {err}") from None
        self.train_split = train_split or self._manifest.find_split("train")
        self.val_split = val_split or self._manifest.find_split("val")
        for split in (self.train_split, self.val_split):
            if self._manifest.split(split).num_images == 0:
                raise ValueError(f"the {split} split in {self.data_dir} has no images")
        self._skip_counter = SkipCounter()

    @property
    def manifest(self) -> CocoManifest:
        """The parsed ``manifest.json``."""
        return self._manifest

    @property
    def categories(self) -> list[dict[str, Any]]:
        """COCO categories in label order (label ``i + 1`` is ``categories[i]``)."""
        return [dict(c) for c in self._manifest.categories]

    @property
    def num_classes(self) -> int:
        """Object categories (background not counted)."""
        return self._manifest.num_classes

    @property
    def num_train(self) -> int:
        """Train images."""
        return self._manifest.split(self.train_split).num_images

    @property
    def num_val(self) -> int:
        """Val images."""
        return self._manifest.split(self.val_split).num_images

    @property
    def skipped_samples(self) -> int:
        """Undecodable samples skipped so far (this process and its workers)."""
        return self._skip_counter.value

    def _rank_and_world_size(self) -> tuple[int, int]:
        return rank_and_world_size(self.trainer)

    def dataloader(self, split: str, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The loader of ``"train"`` or ``"val"`` for an explicit rank and world size."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        name = self.train_split if split == "train" else self.val_split
        info = self._manifest.split(name)
        urls = [join_location(self.data_dir, s.name) for s in info.shards]
        sizes = [s.num_samples for s in info.shards]
        label_of = {cid: i + 1 for i, cid in enumerate(self._manifest.category_ids)}
        common = dict(rank=rank, world_size=world_size, batch_size=self.batch_size, skip_counter=self._skip_counter,
                      num_workers=self.num_workers, label_of=label_of)
        if split == "train":
            stream = _DetectionStream(
                urls, sizes, train=True, transform=detection_train_transform(self.image_size, self.train_augment),
                seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                num_batches=train_batches_per_rank(info.num_images, self.batch_size, world_size), **common)
        else:
            stream = _DetectionStream(urls, sizes, train=False, transform=detection_eval_transform(self.image_size),
                                      **common)
        epoch_fn = lambda: None if self.trainer is None else self.trainer.current_epoch  # noqa: E731
        return _EpochDataLoader(stream, epoch_fn=epoch_fn, num_workers=self.num_workers,
                                pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        """Train batches: the same count on every rank."""
        return self.dataloader("train", *self._rank_and_world_size())

    def val_dataloader(self) -> DataLoader:
        """Val batches: every val image exactly once across ranks and workers."""
        return self.dataloader("val", *self._rank_and_world_size())

    def test_dataloader(self) -> DataLoader:
        """The val split."""
        return self.dataloader("val", *self._rank_and_world_size())
