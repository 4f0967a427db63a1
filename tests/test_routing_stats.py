"""Routing statistics: specificity and bimodality on synthetic routing, hooks on a real model."""
from __future__ import annotations

import math

import pytest
import torch

import condconv
from condconv.routing_stats import (
    UNIFORM_BIMODALITY,
    bimodality_coefficient,
    class_means,
    class_specificity,
    collect_routing,
    expert_specificity,
    extreme_fraction,
    layer_stats,
    routing_statistics,
)

N, CLASSES, EXPERTS = 2000, 10, 8


def _labels(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CLASSES, (N,), generator=torch.Generator().manual_seed(seed))


def test_specificity_is_near_one_when_each_class_uses_its_own_experts() -> None:
    labels = _labels()
    g = torch.Generator().manual_seed(1)
    # Class c switches on expert c % 8 (classes 0/8 and 1/9 share one), small noise everywhere.
    weights = torch.full((N, EXPERTS), 0.03)
    weights[torch.arange(N), labels % EXPERTS] = 0.97
    weights += 0.02 * torch.rand(N, EXPERTS, generator=g)
    assert class_specificity(weights, labels) > 0.97


def test_specificity_is_near_zero_when_routing_ignores_the_class() -> None:
    labels = _labels()
    g = torch.Generator().manual_seed(2)
    uniform = torch.rand(N, EXPERTS, generator=g)
    assert class_specificity(uniform, labels) < 0.02
    # Bimodal but class-independent routing is not class-specific either.
    coin = (torch.rand(N, EXPERTS, generator=g) > 0.5).float()
    assert class_specificity(coin, labels) < 0.02


def test_specificity_grows_with_the_class_signal() -> None:
    labels = _labels()
    g = torch.Generator().manual_seed(3)
    signal = torch.nn.functional.one_hot(labels % EXPERTS, EXPERTS).float()
    noise = torch.rand(N, EXPERTS, generator=g)
    scores = [class_specificity(a * signal + (1 - a) * noise, labels) for a in (0.0, 0.3, 0.6, 1.0)]
    assert scores == sorted(scores) and 0.1 < scores[1] < scores[2] < 0.99 < scores[3] + 1e-6


def test_constant_experts_are_left_out_of_the_mean() -> None:
    labels = _labels()
    weights = torch.nn.functional.one_hot(labels % 4, EXPERTS).float()  # experts 4..7 always 0
    eta = expert_specificity(weights, labels)
    assert torch.isnan(eta[4:]).all() and (eta[:4] > 0.99).all()
    assert class_specificity(weights, labels) > 0.99
    assert class_specificity(torch.full((N, EXPERTS), 0.5), labels) == 0.0


def test_class_means_shape_values_and_empty_classes() -> None:
    labels = torch.tensor([0, 0, 2, 2])
    weights = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.5, 1.0], [0.5, 1.0]])
    means = class_means(weights, labels, num_classes=4)
    assert means.shape == (4, 2)
    torch.testing.assert_close(means[0], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(means[2], torch.tensor([0.5, 1.0]))
    assert torch.isnan(means[1]).all() and torch.isnan(means[3]).all()
    with pytest.raises(ValueError, match="labels span"):
        class_means(weights, labels, num_classes=2)
    with pytest.raises(ValueError, match="expected \\[N, experts\\] and \\[N\\]"):
        class_means(weights, labels[:3])


def test_bimodality_separates_two_peaks_from_uniform() -> None:
    g = torch.Generator().manual_seed(4)
    two_peaks = torch.cat([0.1 * torch.rand(1000, generator=g), 0.9 + 0.1 * torch.rand(1000, generator=g)])
    uniform = torch.rand(2000, generator=g)
    normal = 0.5 + 0.1 * torch.randn(2000, generator=g)
    bc_two, bc_uniform, bc_normal = (bimodality_coefficient(x) for x in (two_peaks, uniform, normal))
    assert bc_two > 0.9
    assert abs(bc_uniform - UNIFORM_BIMODALITY) < 0.03
    assert abs(bc_normal - 1 / 3) < 0.03
    assert bc_two > UNIFORM_BIMODALITY > bc_normal
    # Skewed two peaks (90% near 0) still count as bimodal.
    skewed = torch.cat([0.05 * torch.rand(1800, generator=g), 0.95 + 0.05 * torch.rand(200, generator=g)])
    assert bimodality_coefficient(skewed) > UNIFORM_BIMODALITY
    assert extreme_fraction(two_peaks) == 1.0 and 0.15 < extreme_fraction(uniform) < 0.25
    assert bimodality_coefficient(torch.full((10,), 0.3)) == 0.0
    with pytest.raises(ValueError, match="at least 4"):
        bimodality_coefficient(torch.rand(3))


def test_bimodality_matches_the_sample_corrected_formula() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    x = torch.rand(57, generator=torch.Generator().manual_seed(5), dtype=torch.double)
    n = x.numel()
    skew = scipy_stats.skew(x.numpy(), bias=False)
    kurt = scipy_stats.kurtosis(x.numpy(), bias=False)
    want = (skew**2 + 1) / (kurt + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))
    assert math.isclose(bimodality_coefficient(x), want, rel_tol=1e-9)


def test_layer_stats_histogram_covers_every_weight() -> None:
    labels = _labels()
    weights = torch.rand(N, EXPERTS, generator=torch.Generator().manual_seed(6))
    s = layer_stats("blocks.3.routing", weights, labels, CLASSES, depth=3, bins=10)
    assert s.histogram.sum().item() == N * EXPERTS and s.bin_edges.numel() == 11
    assert s.class_means.shape == (CLASSES, EXPERTS) and s.num_examples == N and s.depth == 3
    assert 0.0 <= s.specificity < 0.02 and 0.5 < s.bimodality < 0.6
    with pytest.raises(ValueError, match="bins=0"):
        layer_stats("x", weights, labels, bins=0)


def _batches(n_batches: int, batch: int = 6, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n_batches)]


@pytest.mark.parametrize("scope", ["block", "layer"])
def test_hooks_record_every_routing_fn_of_a_real_model(scope: str) -> None:
    model = condconv.create_model("mobilenet_v1", width_mult=0.25, num_experts=2, resolution=32,
                                  num_classes=10, routing_scope=scope)
    model.train()
    record = collect_routing(model, _batches(3), max_batches=2)
    names = list(record.weights)
    if scope == "block":
        assert names == [f"blocks.{i}.routing" for i in range(13)] + ["classifier.routing"]
    else:  # each CondConv layer routes itself: depthwise and pointwise conv of each block, and the FC
        assert names[:2] == ["blocks.0.conv_dw.conv.routing", "blocks.0.conv_pw.conv.routing"]
        assert len(names) == 2 * 13 + 1 and names[-1] == "classifier.fc.routing"
    assert record.num_examples == 12
    assert all(w.shape == (12, 2) and ((w >= 0) & (w <= 1)).all() for w in record.weights.values())
    assert model.training  # mode restored
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    stats = routing_statistics(record, num_classes=10)
    assert [s.name for s in stats] == names and [s.depth for s in stats] == list(range(len(names)))


def test_collect_routing_rejects_static_models_and_empty_data() -> None:
    with pytest.raises(ValueError, match="no RoutingFn"):
        collect_routing(condconv.create_model("mobilenet_v1", width_mult=0.25, resolution=32), _batches(1))
    model = condconv.create_model("mobilenet_v1", width_mult=0.25, num_experts=2, resolution=32, num_classes=10)
    with pytest.raises(ValueError, match="no batches"):
        collect_routing(model, [])
    with pytest.raises(ValueError, match="max_batches=0"):
        collect_routing(model, _batches(1), max_batches=0)
