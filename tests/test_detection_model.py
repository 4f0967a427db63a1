"""Multi-scale backbone features and the SSD / SSDLite detectors on them (static and CondConv), MADDs."""
from __future__ import annotations

import pytest
import torch

import condconv
from condconv.detection import DetectorSpec, create_detector
from condconv.layers import CondConv2d


def _targets(n: int) -> list[dict[str, torch.Tensor]]:
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 20.0, 60.0, 62.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.int64)]
    return [{"boxes": boxes[i % 2], "labels": labels[i % 2]} for i in range(n)]


@pytest.mark.parametrize("arch", ["mobilenet_v1", "resnet50"])
def test_feature_info_matches_multiscale_maps(arch: str) -> None:
    model = condconv.create_model(arch, width_mult=0.25, resolution=64).eval()
    info = model.feature_info
    assert info[-1].index == len(model.blocks) and info[-1].channels == model.num_features
    wanted = [i.index for i in info if i.stride == 16][-1:] + [info[-1].index]
    x = torch.rand(2, 3, 64, 64)
    maps = model.forward_features_multiscale(x, wanted)
    for fmap, i in zip(maps, wanted):
        assert fmap.shape == (2, info[i].channels, 64 // info[i].stride, 64 // info[i].stride)
    with torch.no_grad():
        assert torch.allclose(maps[-1], model.forward_features(x))
    with pytest.raises(ValueError, match="feature indices"):
        model.forward_features_multiscale(x, [len(model.blocks) + 1])


@pytest.mark.parametrize("head, arch, experts, cond_parts", [
    ("ssd", "mobilenet_v1", 0, False),
    ("ssd", "mobilenet_v1", 4, True),
    ("ssdlite", "mobilenet_v2", 2, True),
])
def test_detector_trains_and_detects(head: str, arch: str, experts: int, cond_parts: bool) -> None:
    torch.manual_seed(0)
    spec = DetectorSpec(head=head, condconv_extras=cond_parts, condconv_heads=cond_parts)
    model = create_detector(arch, spec, width_mult=0.25, num_experts=experts, resolution=64, num_classes=3)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    losses = model(images, _targets(2))
    assert set(losses) == {"bbox_regression", "classification"}
    sum(losses.values()).backward()
    # DDP refuses parameters that get no gradient: the detector must use all it holds.
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused, unused[:5]
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    assert out[0]["boxes"].shape[1] == 4 and out[0]["boxes"].shape[0] <= spec.detections_per_img
    if out[0]["labels"].numel():
        assert 1 <= int(out[0]["labels"].min()) and int(out[0]["labels"].max()) <= 3
    cond_in_extras = any(isinstance(m, CondConv2d) for m in model.backbone.extras.modules())
    cond_in_head = any(isinstance(m, CondConv2d) for m in model.head.modules())
    assert cond_in_extras == cond_parts and cond_in_head == cond_parts
    assert condconv.count_madds(model, resolution=64) > 0


def test_ssd300_madds_static_vs_condconv_mobilenet_v1() -> None:
    """The paper's pair at 300x300: CondConv adds a few percent (the paper: about +4%)."""
    static = create_detector("mobilenet_v1", resolution=300, num_classes=80)
    backbone_only = create_detector("mobilenet_v1", num_experts=8, resolution=300, num_classes=80)
    full = create_detector("mobilenet_v1", DetectorSpec(condconv_extras=True, condconv_heads=True),
                           num_experts=8, resolution=300, num_classes=80)
    m_static, m_backbone, m_full = (condconv.count_madds(m, resolution=300) for m in (static, backbone_only, full))
    # Backbone (~1.06G at 300x300) + extras + 1x1 predictors: ~1.25 GMADDs, as SSD-MobileNet.
    assert 1.15e9 < m_static < 1.35e9
    assert 1.01 < m_backbone / m_static < 1.03
    assert 1.03 < m_full / m_static < 1.06
    # The backbone's classifier is gone, so the detector's MADDs do not include it.
    assert not any(isinstance(m, torch.nn.Linear) and m.out_features == 80 for m in static.modules())


def test_bad_detector_specs_are_clear() -> None:
    with pytest.raises(ValueError, match="head 'yolo'; expected one of"):
        DetectorSpec(head="yolo")
    with pytest.raises(ValueError, match="num_experts=0"):
        create_detector("mobilenet_v1", DetectorSpec(condconv_heads=True), width_mult=0.25, resolution=64)
    with pytest.raises(ValueError, match=r"feature_indices=\[99\]; expected ints in \[0, 13\]"):
        create_detector("mobilenet_v1", DetectorSpec(feature_indices=[99]), width_mult=0.25, resolution=64)
    with pytest.raises(ValueError, match="predictor_kernel=5"):
        DetectorSpec(predictor_kernel=5)
