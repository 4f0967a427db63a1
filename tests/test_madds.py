"""MADD and parameter counts against the paper's table 1 and torch's FlopCounterMode."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import condconv
from condconv.paper import PAPER_TABLE


def flop_counter_madds(model: torch.nn.Module, resolution: int = 224) -> float:
    """Independent count: FlopCounterMode's conv/linear/matmul FLOPs / 2."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("row", PAPER_TABLE, ids=lambda r: r.arch)
@pytest.mark.parametrize("experts", [0, 8])
def test_paper_table_madds_within_2_percent(row, experts: int) -> None:
    model = condconv.create_model(row.arch, num_experts=experts)
    madds = condconv.count_madds(model, resolution=224)
    paper = (row.condconv_madds if experts else row.static_madds) * 1e6
    assert abs(madds / paper - 1) < 0.02, f"{row.arch} e{experts}: {madds / 1e6:.1f}M vs paper {paper / 1e6:.0f}M"
    independent = flop_counter_madds(model)
    assert abs(independent / madds - 1) < 0.02, f"FlopCounterMode {independent / 1e6:.1f}M vs {madds / 1e6:.1f}M"


@pytest.mark.parametrize("row", PAPER_TABLE, ids=lambda r: r.arch)
def test_static_params_match_standard_architecture(row) -> None:
    params = condconv.count_params(condconv.create_model(row.arch))
    assert abs(params / (row.static_params * 1e6) - 1) < 0.02, f"{row.arch}: {params / 1e6:.2f}M"


@pytest.mark.parametrize("experts,madds_m,params_m", [(4, 402, 13.3), (8, 413, 24.0)])
def test_efficientnet_b0_experts(experts: int, madds_m: float, params_m: float) -> None:
    model = condconv.create_model("efficientnet_b0", num_experts=experts)
    assert abs(condconv.count_madds(model) / (madds_m * 1e6) - 1) < 0.02
    assert abs(condconv.count_params(model) / (params_m * 1e6) - 1) < 0.02


def test_condconv_madds_are_conv_plus_mixing() -> None:
    """A CondConv layer costs its conv plus num_experts x kernel size (the paper's accounting)."""
    layer = condconv.CondConv2d(16, 32, 3, padding=1, num_experts=8)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x[:, :16], torch.ones(x.shape[0], 8))

    conv = 32 * 10 * 10 * 16 * 9
    mixing = 8 * 32 * 16 * 9
    assert condconv.count_madds(Wrap(), resolution=10, in_channels=16) == conv + mixing


def test_madds_grow_with_experts_and_placement() -> None:
    base = condconv.count_madds(condconv.create_model("mobilenet_v1", width_mult=0.25), 64)
    e4 = condconv.count_madds(condconv.create_model("mobilenet_v1", width_mult=0.25, num_experts=4), 64)
    e8 = condconv.count_madds(condconv.create_model("mobilenet_v1", width_mult=0.25, num_experts=8), 64)
    last2 = condconv.count_madds(
        condconv.create_model("mobilenet_v1", width_mult=0.25, num_experts=8, placement="last:2"), 64
    )
    assert base < e4 < e8
    assert base < last2 < e8


def test_count_madds_restores_training_mode() -> None:
    model = condconv.create_model("mobilenet_v2", width_mult=0.35, num_classes=10)
    model.train()
    condconv.count_madds(model, 32)
    assert model.training
