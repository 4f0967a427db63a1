"""Layering of plain config dicts (YAML files, overrides), shared by `condconv fit` and `condconv sweep`."""
from __future__ import annotations

import copy
from typing import Any, Mapping

__all__ = ["deep_merge"]


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in key by key (nested mappings merge, values replace)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), value)
        else:
            out[key] = copy.deepcopy(value)
    return out
