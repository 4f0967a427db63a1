"""ResNet-50 (He et al., 2016; v1.5 with the stride on the 3x3 conv, as torchvision).

Paper placement: conv5_x, the last 3 bottlenecks (4093M -> 4213M MADDs with 8 experts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from torch import nn

from condconv.blocks import STATIC, Bottleneck, Classifier, ConvBnAct, ConvFactory, make_divisible
from condconv.models.base import CondConvNet, init_weights
from condconv.models.registry import ArchDef, register_model
from condconv.placement import FC
from condconv.spec import ModelSpec

LAYERS = (3, 4, 6, 3)
PLANES = (64, 128, 256, 512)


@dataclass(frozen=True)
class BottleneckConfig:
    """One bottleneck after width/depth scaling."""

    in_channels: int
    planes: int
    stride: int
    stage: int


def block_configs(spec: ModelSpec) -> list[BottleneckConfig]:
    """The 16 bottlenecks of ResNet-50 (scaled by width and depth)."""
    in_ch = make_divisible(64 * spec.width_mult)
    configs = []
    for stage, (repeats, planes) in enumerate(zip(LAYERS, PLANES)):
        planes = make_divisible(planes * spec.width_mult)
        for i in range(int(math.ceil(repeats * spec.depth_mult))):
            configs.append(BottleneckConfig(in_ch, planes, 2 if (i == 0 and stage > 0) else 1, stage))
            in_ch = planes * Bottleneck.expansion
    return configs


def build(spec: ModelSpec, configs: Sequence[BottleneckConfig], positions: frozenset) -> CondConvNet:
    """Build ResNet-50 with CondConv bottlenecks at ``positions``."""
    cond = ConvFactory.from_spec(spec)
    stem_ch = make_divisible(64 * spec.width_mult)
    stem = nn.Sequential(
        ConvBnAct(3, stem_ch, 7, 2, 1, STATIC), nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    )
    blocks, strides, stride = [], [], 4
    for idx, cfg in enumerate(configs):
        blocks.append(Bottleneck(cfg.in_channels, cfg.planes, cfg.stride, cond if idx in positions else STATIC))
        stride *= cfg.stride
        strides.append(stride)
    out_ch = configs[-1].planes * Bottleneck.expansion
    dropout = 0.0 if spec.dropout is None else spec.dropout
    classifier = Classifier(out_ch, spec.num_classes, dropout, cond if FC in positions else STATIC)
    model = CondConvNet(stem, blocks, None, classifier, [c.planes * Bottleneck.expansion for c in configs], strides)
    init_weights(model)
    return model


register_model(
    ArchDef(
        name="resnet50",
        block_configs=block_configs,
        paper_placement=lambda configs: {i for i, c in enumerate(configs) if c.stage == 3},
        build=build,
        extras=(FC,),
        description="ResNet-50; 16 bottlenecks; paper: conv5_x (last 3)",
    )
)
