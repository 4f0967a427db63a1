"""SSD (Liu et al. 2016) and SSDLite (Sandler et al. 2018) on any `CondConvNet` backbone, static or CondConv.

The detector is torchvision's `SSD` (default boxes, SSD matching, smooth-L1 + hard-negative-mined
cross-entropy loss, `batched_nms` postprocessing, resize/normalise transform); this module only
supplies what torchvision's SSD takes as arguments:

- `SSDBackbone`: the backbone's multi-scale feature maps (`CondConvNet.forward_features_multiscale`)
  followed by extra stride-2 layers, returned as an ``OrderedDict`` as torchvision expects;
- the prediction heads (3x3 convs for SSD, depthwise-separable for SSDLite), whose convs can be
  CondConv, each routed on its own input;
- `DefaultBoxGenerator` with 6 boxes per location (aspect ratios 1, 1', 2, 1/2, 3, 1/3; scales
  0.2..0.95, as SSD-MobileNet in the TF object detection API and torchvision's SSDLite), 4 on the
  finest map (no 3 and 1/3, as SSD300).

`create_detector(backbone_spec, detector_spec)` builds it; `condconv.count_madds(detector,
resolution)` counts its MADDs (backbone, extras, heads; postprocessing is not counted).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDScoringHead

from condconv.blocks import STATIC, ConvBnAct, ConvFactory, make_divisible
from condconv.detection.spec import DetectorSpec
from condconv.layers import CondConv2d, init_expert_kernels_
from condconv.models.base import CondConvNet, init_weights
from condconv.models.registry import create_model
from condconv.spec import ModelSpec

__all__ = ["SSDBackbone", "ExtraLayer", "SSDPredictionHead", "create_detector", "default_feature_indices",
           "detector_name", "DEFAULT_EXTRA_CHANNELS"]

# SSD-MobileNet's extra layers (TF object detection API), scaled by the backbone's width.
DEFAULT_EXTRA_CHANNELS = (512, 256, 256, 128)
_MIN_EXTRA_CHANNELS = 16


def default_feature_indices(body: CondConvNet) -> list[int]:
    """The last block at stride <= 16 and the final features (after the head): SSD-MobileNet's two maps."""
    info = body.feature_info
    at_16 = [f.index for f in info[:-1] if f.stride <= 16]
    final = info[-1].index
    return [at_16[-1], final] if at_16 and at_16[-1] != final else [final]


class ExtraLayer(nn.Module):
    """One extra feature layer halving the resolution: 1x1 reduce to ``out/2`` then a stride-2 3x3.

    SSD: 1x1 -> 3x3 stride 2 (full conv). SSDLite: 1x1 -> depthwise 3x3 stride 2 -> 1x1 project.
    A CondConv layer (``factory`` with experts) shares one routing function over its convs, as a
    CondConv backbone block does.
    """

    def __init__(self, in_channels: int, out_channels: int, factory: ConvFactory = STATIC, lite: bool = False) -> None:
        super().__init__()
        mid = max(1, out_channels // 2)
        act = nn.ReLU6 if lite else nn.ReLU
        self.routing = factory.routing_fn(in_channels)
        self.reduce = ConvBnAct(in_channels, mid, 1, 1, 1, factory, nn.BatchNorm2d, act)
        if lite:
            self.downsample = ConvBnAct(mid, mid, 3, 2, mid, factory, nn.BatchNorm2d, act)
            self.project = ConvBnAct(mid, out_channels, 1, 1, 1, factory, nn.BatchNorm2d, act)
        else:
            self.downsample = ConvBnAct(mid, out_channels, 3, 2, 1, factory, nn.BatchNorm2d, act)
            self.project = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The next, half-resolution feature map."""
        r = self.routing(x) if self.routing is not None else None
        x = self.downsample(self.reduce(x, r), r)
        return self.project(x, r) if self.project is not None else x


class SSDBackbone(nn.Module):
    """Backbone feature maps at ``indices`` plus the extra layers, as ``OrderedDict("0": ..., "1": ...)``.

    Parts of the body a detector does not use (the classifier, the head and blocks past the deepest
    map) are replaced by `nn.Identity`: they cost no MADDs and leave DDP no unused parameters.
    """

    def __init__(self, body: CondConvNet, indices: Sequence[int], extras: Sequence[nn.Module],
                 extra_channels: Sequence[int]) -> None:
        super().__init__()
        info = body.feature_info
        last = info[-1].index
        bad = [i for i in indices if not 0 <= i <= last]
        if bad or not indices:
            raise ValueError(f"feature_indices={list(indices)}; expected ints in [0, {last}] "
                             f"({last} = the final features after the head)")
        self.indices = list(indices)
        body.classifier = nn.Identity()
        if last not in self.indices:
            body.head = nn.Identity()
            for i in range(max(self.indices) + 1, len(body.blocks)):
                body.blocks[i] = nn.Identity()
        self.body = body
        self.extras = nn.ModuleList(extras)
        self.out_channels = [info[i].channels for i in self.indices] + list(extra_channels)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Feature maps from fine to coarse."""
        features = self.body.forward_features_multiscale(x, self.indices)
        for extra in self.extras:
            features.append(extra(features[-1]))
        return OrderedDict((str(i), f) for i, f in enumerate(features))


def _predictor(in_channels: int, out_channels: int, factory: ConvFactory, lite: bool, kernel: int) -> nn.Module:
    if lite:  # depthwise 3x3 + BN + ReLU6, then a 1x1 projection (torchvision's SSDLite predictor)
        return nn.Sequential(
            ConvBnAct(in_channels, in_channels, 3, 1, in_channels, factory, nn.BatchNorm2d, nn.ReLU6),
            factory.conv(in_channels, out_channels, 1, bias=True),
        )
    return factory.conv(in_channels, out_channels, kernel, bias=True)


def _init_predictors(module: nn.Module, lite: bool) -> None:
    # torchvision's inits: xavier-uniform for SSD's predictors, normal(0, 0.03) for SSDLite's.
    init = (lambda w: nn.init.normal_(w, 0.0, 0.03)) if lite else nn.init.xavier_uniform_
    for m in module.modules():
        if isinstance(m, CondConv2d):
            init_expert_kernels_(m.weight, init)
        elif isinstance(m, nn.Conv2d):
            init(m.weight)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class SSDPredictionHead(nn.Module):
    """Class logits and box offsets for every default box of every feature map (torchvision's output dict)."""

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int,
                 factory: ConvFactory = STATIC, lite: bool = False, kernel: int = 1) -> None:
        super().__init__()
        # Each predictor conv of a CondConv head routes on its own input (there is no enclosing block).
        if factory.conditional:
            factory = dataclasses.replace(factory, scope="layer")
        cls = nn.ModuleList(_predictor(c, num_classes * a, factory, lite, kernel) for c, a in zip(in_channels, num_anchors))
        reg = nn.ModuleList(_predictor(c, 4 * a, factory, lite, kernel) for c, a in zip(in_channels, num_anchors))
        for part in (cls, reg):
            init_weights(part)  # BN and routing FCs as the backbone's
            _init_predictors(part, lite)
        self.classification_head = SSDScoringHead(cls, num_classes)
        self.regression_head = SSDScoringHead(reg, 4)

    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"bbox_regression": [B, A, 4], "cls_logits": [B, A, num_classes]}`` over all A default boxes."""
        return {"bbox_regression": self.regression_head(x), "cls_logits": self.classification_head(x)}


def detector_name(backbone: ModelSpec, detector: DetectorSpec) -> str:
    """The detector's run name, e.g. ``ssd300-mobilenet_v1-w1.0-e8-paper``."""
    return detector.name(backbone.name, backbone.resolution)


def create_detector(backbone: Union[ModelSpec, str], detector: Optional[DetectorSpec] = None,
                    **backbone_overrides: object) -> SSD:
    """An SSD (torchvision's) on a CondConv or static backbone.

    ``backbone``: a `ModelSpec` (or arch name plus ModelSpec fields as keywords) whose
    ``resolution`` is the detector's square input size and ``num_classes`` the number of object
    classes (background excluded; the detector predicts ``num_classes + 1`` scores). Returns
    `torchvision.models.detection.SSD`: train mode takes ``(images, targets)`` and returns the
    losses, eval mode returns per-image ``boxes`` (xyxy, input pixels), ``scores``, ``labels``
    (1..num_classes). ``model.spec`` and ``model.detector_spec`` record what was built.
    """
    if isinstance(backbone, str):
        backbone = ModelSpec(arch=backbone, **backbone_overrides)  # type: ignore[arg-type]
    elif backbone_overrides:
        backbone = backbone.replace(**backbone_overrides)
    detector = detector or DetectorSpec()
    if (detector.condconv_extras or detector.condconv_heads) and backbone.num_experts == 0:
        raise ValueError("condconv_extras/condconv_heads need CondConv experts: the backbone spec has "
                         "num_experts=0; set num_experts > 0")
    body = create_model(backbone)
    if not isinstance(body, CondConvNet):
        raise ValueError(f"arch {backbone.arch!r} does not build a CondConvNet; SSD needs its feature maps")
    indices = detector.feature_indices if detector.feature_indices is not None else default_feature_indices(body)
    lite = detector.head == "ssdlite"
    cond = ConvFactory.from_spec(backbone)
    extra_channels = detector.extra_channels
    if extra_channels is None:
        extra_channels = [max(_MIN_EXTRA_CHANNELS, make_divisible(c * backbone.width_mult)) for c in DEFAULT_EXTRA_CHANNELS]
    info = body.feature_info
    bad = [i for i in indices if not 0 <= i <= info[-1].index]
    if bad:
        raise ValueError(f"feature_indices={list(indices)}; expected ints in [0, {info[-1].index}] for "
                         f"{backbone.arch} ({info[-1].index} = the final features after the head)")
    in_ch = info[indices[-1]].channels
    extras = []
    for out_ch in extra_channels:
        extras.append(ExtraLayer(in_ch, out_ch, cond if detector.condconv_extras else STATIC, lite))
        in_ch = out_ch
    extras_module = nn.ModuleList(extras)
    init_weights(extras_module)
    features = SSDBackbone(body, indices, extras_module, extra_channels)
    levels = len(features.out_channels)
    # The finest map gets 4 boxes per location (no 3 and 1/3), as SSD300 and SSD-MobileNet do.
    anchors = DefaultBoxGenerator([[2]] + [[2, 3]] * (levels - 1), min_ratio=0.2, max_ratio=0.95)
    head = SSDPredictionHead(features.out_channels, anchors.num_anchors_per_location(), backbone.num_classes + 1,
                             cond if detector.condconv_heads else STATIC, lite, detector.predictor_kernel)
    size = (backbone.resolution, backbone.resolution)
    model = SSD(features, anchors, size, backbone.num_classes + 1, head=head,
                score_thresh=detector.score_thresh, nms_thresh=detector.nms_thresh,
                detections_per_img=detector.detections_per_img, topk_candidates=detector.topk_candidates)
    model.spec = backbone
    model.detector_spec = detector
    return model

