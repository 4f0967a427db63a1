"""EfficientNet-B0 (Tan & Le, 2019), scalable by width and depth multipliers.

Paper placement: stages 5-7, the last 8 of 16 MBConv blocks (391M -> 413M MADDs with 8 experts).
"""
from __future__ import annotations

from functools import partial

from torch import nn

from condconv.models.mbnet import MBNetDef, Stage, build_mbnet, expand_stages
from condconv.models.registry import ArchDef, register_model

EFFICIENTNET_B0 = MBNetDef(
    stem_channels=32,
    stages=[
        Stage("ds", 1, 3, 1, 1, 16, se_ratio=0.25),
        Stage("ir", 2, 3, 2, 6, 24, se_ratio=0.25),
        Stage("ir", 2, 5, 2, 6, 40, se_ratio=0.25),
        Stage("ir", 3, 3, 2, 6, 80, se_ratio=0.25),
        Stage("ir", 3, 5, 1, 6, 112, se_ratio=0.25),
        Stage("ir", 4, 5, 2, 6, 192, se_ratio=0.25),
        Stage("ir", 1, 3, 1, 6, 320, se_ratio=0.25),
    ],
    head_channels=1280,
    act_layer=partial(nn.SiLU, inplace=True),
    bn_eps=1e-3,
    pw_act=False,
    dropout=0.2,
    drop_path_rate=0.2,
)

register_model(
    ArchDef(
        name="efficientnet_b0",
        block_configs=partial(expand_stages, EFFICIENTNET_B0),
        # Stages are 0-indexed here: the paper's stages 5-7 are 4..6.
        paper_placement=lambda configs: {i for i, c in enumerate(configs) if c.stage >= 4},
        build=partial(build_mbnet, EFFICIENTNET_B0),
        description="EfficientNet-B0; 16 blocks; paper: stages 5-7 (last 8 blocks)",
    )
)
