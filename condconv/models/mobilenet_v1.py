"""MobileNetV1 (Howard et al., 2017): 13 depthwise-separable blocks.

Paper placement: every body block plus the FC classifier (567M -> 600M MADDs with 8 experts).
"""
from __future__ import annotations

from functools import partial

from torch import nn

from condconv.models.mbnet import MBNetDef, Stage, build_mbnet, expand_stages
from condconv.models.registry import ArchDef, register_model
from condconv.placement import FC

MOBILENET_V1 = MBNetDef(
    stem_channels=32,
    stages=[
        Stage("ds", 1, 3, 1, 1, 64, skip=False),
        Stage("ds", 1, 3, 2, 1, 128, skip=False),
        Stage("ds", 1, 3, 1, 1, 128, skip=False),
        Stage("ds", 1, 3, 2, 1, 256, skip=False),
        Stage("ds", 1, 3, 1, 1, 256, skip=False),
        Stage("ds", 1, 3, 2, 1, 512, skip=False),
        Stage("ds", 5, 3, 1, 1, 512, skip=False),
        Stage("ds", 1, 3, 2, 1, 1024, skip=False),
        Stage("ds", 1, 3, 1, 1, 1024, skip=False),
    ],
    head_channels=None,
    act_layer=partial(nn.ReLU, inplace=True),
    pw_act=True,
    dropout=0.0,
)

register_model(
    ArchDef(
        name="mobilenet_v1",
        block_configs=partial(expand_stages, MOBILENET_V1),
        paper_placement=lambda configs: set(range(len(configs))) | {FC},
        build=partial(build_mbnet, MOBILENET_V1),
        extras=(FC,),
        description="MobileNetV1; 13 blocks; paper: all blocks + FC",
    )
)
