"""Which rank of how many a data module serves: from its Trainer, else from torch.distributed."""
from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["rank_and_world_size"]


def rank_and_world_size(trainer: Optional[Any]) -> tuple[int, int]:
    """(global rank, world size) of ``trainer``; of the initialised process group when there is no
    Trainer (a loader built by hand in a DDP test or a benchmark); (0, 1) otherwise."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
