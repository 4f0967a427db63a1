"""MnasNet-A1 (Tan et al., 2019): searched MBConv blocks with squeeze-excitation in some stages.

Paper placement: the late blocks (312M -> 325M MADDs with 8 experts).
"""
from __future__ import annotations

from functools import partial

from torch import nn

from condconv.models.mbnet import MBNetDef, Stage, build_mbnet, expand_stages
from condconv.models.registry import ArchDef, register_model

MNASNET_A1 = MBNetDef(
    stem_channels=32,
    stages=[
        Stage("ds", 1, 3, 1, 1, 16, skip=False),
        Stage("ir", 2, 3, 2, 6, 24),
        Stage("ir", 3, 5, 2, 3, 40, se_ratio=0.25),
        Stage("ir", 4, 3, 2, 6, 80),
        Stage("ir", 2, 3, 1, 6, 112, se_ratio=0.25),
        Stage("ir", 3, 5, 2, 6, 160, se_ratio=0.25),
        Stage("ir", 1, 3, 1, 6, 320),
    ],
    head_channels=1280,
    act_layer=partial(nn.ReLU, inplace=True),
    bn_eps=1e-3,
    pw_act=False,
    dropout=0.2,
)

register_model(
    ArchDef(
        name="mnasnet_a1",
        block_configs=partial(expand_stages, MNASNET_A1),
        # Stages 5-7 (0-indexed 4..6): the last 6 blocks, from the 112-channel stage on.
        paper_placement=lambda configs: {i for i, c in enumerate(configs) if c.stage >= 4},
        build=partial(build_mbnet, MNASNET_A1),
        description="MnasNet-A1; 16 blocks; paper: late blocks (last 6)",
    )
)
