"""MobileNetV2 (Sandler et al., 2018): 17 inverted-residual blocks, 1x1 head to 1280, FC.

Paper placement: every body block, the head 1x1 conv and the FC (301M -> 329M MADDs with 8 experts).
"""
from __future__ import annotations

from functools import partial

from torch import nn

from condconv.models.mbnet import MBNetDef, Stage, build_mbnet, expand_stages
from condconv.models.registry import ArchDef, register_model
from condconv.placement import FC, HEAD

MOBILENET_V2 = MBNetDef(
    stem_channels=32,
    stages=[
        Stage("ir", 1, 3, 1, 1, 16),
        Stage("ir", 2, 3, 2, 6, 24),
        Stage("ir", 3, 3, 2, 6, 32),
        Stage("ir", 4, 3, 2, 6, 64),
        Stage("ir", 3, 3, 1, 6, 96),
        Stage("ir", 3, 3, 2, 6, 160),
        Stage("ir", 1, 3, 1, 6, 320),
    ],
    head_channels=1280,
    act_layer=partial(nn.ReLU6, inplace=True),
    scale_head=False,
    dropout=0.2,
)

register_model(
    ArchDef(
        name="mobilenet_v2",
        block_configs=partial(expand_stages, MOBILENET_V2),
        paper_placement=lambda configs: set(range(len(configs))) | {HEAD, FC},
        build=partial(build_mbnet, MOBILENET_V2),
        description="MobileNetV2; 17 blocks; paper: all blocks + head + FC",
    )
)
