"""Data: converters to webdataset shards and FFCV `.beton` files, the digits demo source, the data modules.

`ShardDataModule` (webdataset) and `FFCVDataModule` (FFCV) are imported lazily (they pull in
Lightning and torch, and ffcv) so that `import pipeline.data.digits` and the `condconv data` CLI
stay light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.data.ffcv_datamodule import FFCVDataModule
    from pipeline.data.shard_datamodule import ShardDataModule

__all__ = ["FFCVDataModule", "ShardDataModule"]


def __getattr__(name: str) -> Any:
    if name == "ShardDataModule":
        from pipeline.data.shard_datamodule import ShardDataModule

        return ShardDataModule
    if name == "FFCVDataModule":
        from pipeline.data.ffcv_datamodule import FFCVDataModule

        return FFCVDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
