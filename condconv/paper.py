"""The paper's reference numbers (Yang et al., 2019, table 1: MADDs at 224x224 and ImageNet top-1)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PaperRow", "PAPER_TABLE"]


@dataclass(frozen=True)
class PaperRow:
    """One architecture of the paper's table 1 (MADDs in millions, top-1 in percent)."""

    arch: str
    static_madds: float
    static_top1: float
    condconv_madds: float
    condconv_top1: float
    static_params: float  # millions, of the standard architecture


PAPER_TABLE: tuple[PaperRow, ...] = (
    PaperRow("mobilenet_v1", 567, 71.9, 600, 73.7, 4.2),
    PaperRow("mobilenet_v2", 301, 71.6, 329, 74.6, 3.5),
    PaperRow("mnasnet_a1", 312, 74.9, 325, 76.2, 3.9),
    PaperRow("resnet50", 4093, 77.7, 4213, 78.6, 25.6),
    PaperRow("efficientnet_b0", 391, 77.2, 413, 78.3, 5.3),
)
