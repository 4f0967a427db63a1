"""Shared builder for the MobileNet family (MobileNetV1/V2, MnasNet, EfficientNet).

An architecture is a stem width, a list of stages and a head width; the builder expands stages
into per-block configs (so placements can be checked before building) and builds them with a
static or CondConv factory per block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import nn

from condconv.blocks import (
    STATIC,
    Classifier,
    ConvBnAct,
    ConvFactory,
    ConvHead,
    DepthwiseSeparable,
    InvertedResidual,
    make_divisible,
)
from condconv.models.base import CondConvNet, init_weights
from condconv.placement import FC, HEAD
from condconv.spec import ModelSpec

__all__ = ["Stage", "BlockConfig", "MBNetDef", "expand_stages", "build_mbnet"]


@dataclass(frozen=True)
class Stage:
    """A run of ``repeats`` identical blocks (the first one strided): "ds" depthwise-separable or "ir" MBConv."""

    kind: str
    repeats: int
    kernel: int
    stride: int
    expand: float
    channels: int
    se_ratio: float = 0.0
    skip: bool = True


@dataclass(frozen=True)
class BlockConfig:
    """One body block after width/depth scaling."""

    kind: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: float
    se_ratio: float
    skip: bool
    stage: int


@dataclass(frozen=True)
class MBNetDef:
    """A MobileNet-family architecture: stem, stages, head, activation and defaults."""

    stem_channels: int
    stages: Sequence[Stage]
    head_channels: Optional[int]
    act_layer: Callable[[], nn.Module]
    bn_eps: float = 1e-5
    scale_head: bool = True  # EfficientNet/MnasNet scale the head with width; MobileNetV2 only widens it
    pw_act: bool = True  # MobileNetV1's pointwise conv has an activation; the DS block of later nets does not
    dropout: float = 0.2
    drop_path_rate: float = 0.0


def _round_repeats(repeats: int, depth_mult: float) -> int:
    return int(math.ceil(repeats * depth_mult))


def expand_stages(net: MBNetDef, spec: ModelSpec) -> list[BlockConfig]:
    """The body blocks of ``net`` scaled by the spec's width and depth multipliers."""
    in_ch = make_divisible(net.stem_channels * spec.width_mult)
    configs = []
    for stage_idx, st in enumerate(net.stages):
        out_ch = make_divisible(st.channels * spec.width_mult)
        for i in range(_round_repeats(st.repeats, spec.depth_mult)):
            configs.append(
                BlockConfig(st.kind, in_ch, out_ch, st.kernel, st.stride if i == 0 else 1, st.expand, st.se_ratio, st.skip, stage_idx)
            )
            in_ch = out_ch
    return configs


def build_mbnet(net: MBNetDef, spec: ModelSpec, configs: Sequence[BlockConfig], positions: frozenset) -> CondConvNet:
    """Build the network; blocks whose index is in ``positions`` (and "head"/"fc") are CondConv."""
    cond = ConvFactory.from_spec(spec)
    norm = lambda c: nn.BatchNorm2d(c, eps=net.bn_eps)  # noqa: E731
    drop_path = net.drop_path_rate if spec.drop_path_rate is None else spec.drop_path_rate
    stem_ch = make_divisible(net.stem_channels * spec.width_mult)
    stem = ConvBnAct(3, stem_ch, 3, 2, 1, STATIC, norm, net.act_layer)
    blocks, strides, stride = [], [], 2
    for idx, cfg in enumerate(configs):
        factory = cond if idx in positions else STATIC
        # Stochastic depth grows linearly with depth, as in EfficientNet.
        dp = drop_path * idx / len(configs)
        if cfg.kind == "ds":
            block = DepthwiseSeparable(
                cfg.in_channels, cfg.out_channels, cfg.stride, cfg.kernel, factory, norm, net.act_layer,
                cfg.se_ratio, pw_act=net.pw_act, skip=cfg.skip, drop_path_rate=dp,
            )
        else:
            block = InvertedResidual(
                cfg.in_channels, cfg.out_channels, cfg.stride, cfg.kernel, cfg.expand, factory, norm,
                net.act_layer, cfg.se_ratio, drop_path_rate=dp,
            )
        blocks.append(block)
        stride *= cfg.stride
        strides.append(stride)
    last_ch = configs[-1].out_channels
    head = None
    if net.head_channels is not None:
        head_ch = (
            make_divisible(net.head_channels * spec.width_mult)
            if net.scale_head
            else make_divisible(net.head_channels * max(1.0, spec.width_mult))
        )
        head = ConvHead(last_ch, head_ch, cond if HEAD in positions else STATIC, norm, net.act_layer)
        last_ch = head_ch
    dropout = net.dropout if spec.dropout is None else spec.dropout
    classifier = Classifier(last_ch, spec.num_classes, dropout, cond if FC in positions else STATIC)
    model = CondConvNet(stem, blocks, head, classifier, [c.out_channels for c in configs], strides)
    init_weights(model)
    return model
