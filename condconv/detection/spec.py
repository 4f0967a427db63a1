"""`DetectorSpec`: what SSD to put on a backbone (head kind, CondConv in extras and heads, postprocessing)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

__all__ = ["DetectorSpec", "HEADS"]

# "ssd": SSD300's 3x3 conv predictors (Liu et al. 2016; the CondConv paper's detector);
# "ssdlite": MobileNetV2's depthwise-separable predictors and extra layers (Sandler et al. 2018).
HEADS = ("ssd", "ssdlite")


@dataclass
class DetectorSpec:
    """The detector around a backbone `condconv.ModelSpec` (whose ``resolution`` is the input size
    and ``num_classes`` the number of object classes, background not counted).

    ``feature_indices``: backbone feature maps fed to the predictors (indices into
    ``CondConvNet.feature_info``); null: the last block at stride 16 and the final features (the
    layers SSD-MobileNet uses). ``extra_channels``: output channels of the extra stride-2 layers
    after them (null: 512, 256, 256, 128 scaled by the backbone's width, at least 16).
    ``condconv_extras`` / ``condconv_heads``: make those layers CondConv with the backbone's
    experts and routing (one routing function per extra layer, and per predictor conv).
    ``predictor_kernel``: kernel of the SSD head's predictor convs: 1 as SSD-MobileNet in the TF
    object detection API (the paper's detector), 3 as the original VGG SSD300 (3.5x the MADDs
    of the whole MobileNet there); SSDLite's predictors are always depthwise 3x3 + 1x1.
    ``score_thresh``, ``nms_thresh``, ``detections_per_img``, ``topk_candidates``: postprocessing,
    as torchvision's SSD (100 detections per image is what COCO evaluation reads).
    """

    head: str = "ssd"
    feature_indices: Optional[List[int]] = None
    extra_channels: Optional[List[int]] = None
    condconv_extras: bool = False
    condconv_heads: bool = False
    predictor_kernel: int = 1
    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    detections_per_img: int = 100
    topk_candidates: int = 400

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"detector head {self.head!r}; expected one of {list(HEADS)}")
        for name in ("feature_indices", "extra_channels"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = list(value)
                setattr(self, name, value)
            lowest = 0 if name == "feature_indices" else 1
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= lowest for v in value):
                raise ValueError(f"{name}={value!r}; expected a list of ints >= {lowest} or null")
        if self.feature_indices is not None and not self.feature_indices:
            raise ValueError("feature_indices=[]; expected at least one backbone feature map or null")
        for name in ("condconv_extras", "condconv_heads"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}; expected true or false")
        for name in ("score_thresh", "nms_thresh"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r}; expected a number in [0, 1]")
        if self.predictor_kernel not in (1, 3):
            raise ValueError(f"predictor_kernel={self.predictor_kernel!r}; expected 1 or 3")
        for name in ("detections_per_img", "topk_candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected an int >= 1")

    def name(self, backbone_name: str, resolution: int) -> str:
        """Run name such as ``ssd300-mobilenet_v1-w1.0-e8-paper`` (``-cx``/``-ch``: CondConv extras/heads)."""
        parts = [f"{self.head}{resolution}", backbone_name]
        if self.condconv_extras:
            parts.append("cx")
        if self.condconv_heads:
            parts.append("ch")
        return "-".join(parts)

    def replace(self, **changes: object) -> "DetectorSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
