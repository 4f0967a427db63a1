"""`classification_data`: the `data` block of every fit and sweep config, for either data format.

`data.format: wds` (the default) builds a `ShardDataModule` over webdataset shards,
`data.format: ffcv` an `FFCVDataModule` over `.beton` files; every other key means the same for
both, so switching a config to FFCV is one line (plus a `data_dir` with `.beton` files).
LightningCLI accepts a function returning a data module in place of a class (jsonargparse's
`class_from_function`), which is how `condconv fit` and the sweeps use this.
"""
from __future__ import annotations

import os
from typing import Optional

import lightning as L

from pipeline.data.manifest import MANIFEST_FORMAT_FFCV, MANIFEST_NAME

__all__ = ["DATA_FORMATS", "classification_data"]

DATA_FORMATS = ("wds", "ffcv")


def classification_data(
    data_dir: str,
    format: str = "wds",  # noqa: A002 (the config key users write)
    batch_size: int = 64,
    num_workers: int = 2,
    image_size: int = 224,
    val_resize: Optional[int] = None,
    train_augment: str = "standard",
    shuffle_buffer: int = 1000,
    seed: int = 0,
    os_cache: Optional[bool] = None,
) -> L.LightningDataModule:
    """The classification data module for `format`: `ShardDataModule` (wds) or `FFCVDataModule` (ffcv).

    Args:
        data_dir: the shard directory / URL prefix (wds) or the `.beton` directory (ffcv), each with
            its `manifest.json`.
        format: `wds` (webdataset tar shards) or `ffcv` (FFCV `.beton` files; needs the `ffcv` extra).
        batch_size: per-rank batch size.
        num_workers: DataLoader worker processes (wds) or FFCV loader threads (ffcv) per rank.
        image_size: side of the square crops fed to the model.
        val_resize: shorter side before the val center crop; default `floor(image_size / 0.875)`.
        train_augment: `standard`, `none`, and for wds also `randaugment` or `autoaugment`.
        shuffle_buffer: samples in the train shuffle buffer (wds; FFCV shuffles all samples).
        seed: seed of the train shuffles.
        os_cache: ffcv only: read through the OS page cache (default true) or FFCV's process cache.
    """
    if format not in DATA_FORMATS:
        raise ValueError(f"data.format must be one of {list(DATA_FORMATS)}, got {format!r}")
    common = dict(
        data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, image_size=image_size,
        val_resize=val_resize, train_augment=train_augment, shuffle_buffer=shuffle_buffer, seed=seed,
    )  # fmt: skip
    if format == "ffcv":
        from pipeline.data.ffcv_datamodule import FFCVDataModule

        return FFCVDataModule(**common, os_cache=True if os_cache is None else os_cache)
    if os_cache is not None:
        raise ValueError("data.os_cache only applies to data.format: ffcv")
    if _is_ffcv_directory(str(data_dir)):
        raise ValueError(
            f"data_dir={str(data_dir)!r} holds FFCV .beton files, not webdataset shards: set data.format: ffcv"
        )
    from pipeline.data.shard_datamodule import ShardDataModule

    return ShardDataModule(**common)


def _is_ffcv_directory(data_dir: str) -> bool:
    """True when a local `data_dir`'s manifest says it holds `.beton` files (cheap: reads one small file)."""
    import json

    path = os.path.join(data_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            return json.load(f).get("format") == MANIFEST_FORMAT_FFCV
    except (OSError, ValueError, AttributeError):
        return False  # the data module reports a malformed manifest itself
