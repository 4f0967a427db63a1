"""Data: converters to webdataset shards, the digits demo source, and `ShardDataModule`.

`ShardDataModule` is imported lazily (it pulls in Lightning and torch) so that
`import pipeline.data.digits` and the `condconv data` CLI stay light.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.data.shard_datamodule import ShardDataModule

__all__ = ["ShardDataModule"]


def __getattr__(name: str) -> Any:
    if name == "ShardDataModule":
        from pipeline.data.shard_datamodule import ShardDataModule

        return ShardDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
