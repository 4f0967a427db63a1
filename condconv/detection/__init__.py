"""Object detection on CondConv backbones: SSD300 and SSDLite heads (torchvision's SSD underneath)."""
from condconv.detection.spec import HEADS, DetectorSpec
from condconv.detection.ssd import (
    ExtraLayer,
    SSDBackbone,
    SSDPredictionHead,
    create_detector,
    default_feature_indices,
    detector_name,
)

__all__ = [
    "HEADS",
    "DetectorSpec",
    "ExtraLayer",
    "SSDBackbone",
    "SSDPredictionHead",
    "create_detector",
    "default_feature_indices",
    "detector_name",
]
