"""Backbones: shapes, placements, scaling, bad input, summary, and a CondConv model that learns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import condconv
from condconv import CondConv2d, CondLinear, ModelSpec
from condconv.models.base import channels_last_
from condconv.models.registry import get_arch

ARCHS = ["mobilenet_v1", "mobilenet_v2", "mnasnet_a1", "resnet50", "efficientnet_b0"]


def cond_layers(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, (CondConv2d, CondLinear))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("experts", [0, 4])
def test_forward_shape_and_backward(arch: str, experts: int) -> None:
    model = condconv.create_model(arch, width_mult=0.25, num_experts=experts, num_classes=7)
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert (len(cond_layers(model)) > 0) == (experts > 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_placements_all_none_last(arch: str) -> None:
    n = len(get_arch(arch).block_configs(ModelSpec(arch=arch, width_mult=0.25)))
    spec = dict(width_mult=0.25, num_experts=2, num_classes=5)
    assert cond_layers(condconv.create_model(arch, placement="none", **spec)) == []
    all_model = condconv.create_model(arch, placement="all", **spec)
    assert all(block.routing is not None for block in all_model.blocks)
    assert isinstance(all_model.classifier.fc, CondLinear)
    last2 = condconv.create_model(arch, placement="last:2", **spec)
    flags = [block.routing is not None for block in last2.blocks]
    assert flags == [False] * (n - 2) + [True] * 2
    picked = condconv.create_model(arch, placement=[0, 2], **spec)
    assert [i for i, b in enumerate(picked.blocks) if b.routing is not None] == [0, 2]


def test_paper_placements() -> None:
    def cond_blocks(model):
        return [i for i, b in enumerate(model.blocks) if b.routing is not None]

    assert cond_blocks(condconv.create_model("efficientnet_b0", num_experts=8)) == list(range(8, 16))
    assert cond_blocks(condconv.create_model("resnet50", num_experts=8, width_mult=0.25)) == [13, 14, 15]
    v1 = condconv.create_model("mobilenet_v1", num_experts=8, width_mult=0.25)
    assert cond_blocks(v1) == list(range(13)) and isinstance(v1.classifier.fc, CondLinear)
    v2 = condconv.create_model("mobilenet_v2", num_experts=8, width_mult=0.25)
    assert v2.head.routing is not None and isinstance(v2.classifier.fc, CondLinear)
    # paper is the default placement
    assert ModelSpec(arch="mnasnet_a1", num_experts=8).placement == "paper"


def test_one_routing_fn_per_block_shared_by_its_layers() -> None:
    model = condconv.create_model("efficientnet_b0", num_experts=4, width_mult=0.5)
    block = model.blocks[-1]
    routing = [m for m in block.modules() if isinstance(m, condconv.RoutingFn)]
    assert len(routing) == 1
    layers = [m for m in block.modules() if isinstance(m, CondConv2d)]
    assert len(layers) == 3  # expand, depthwise, project (SE stays static)
    seen = []
    handle = routing[0].register_forward_hook(lambda m, i, o: seen.append(o))
    hooks = [l.register_forward_pre_hook(lambda m, args: seen.append(args[1])) for l in layers]
    model(torch.randn(2, 3, 64, 64))
    handle.remove()
    for h in hooks:
        h.remove()
    assert len(seen) == 4 and all(s is seen[0] for s in seen[1:])


def test_width_and_depth_multipliers_scale_the_model() -> None:
    small = condconv.count_params(condconv.create_model("efficientnet_b0", width_mult=0.5))
    base = condconv.count_params(condconv.create_model("efficientnet_b0"))
    deep = condconv.create_model("efficientnet_b0", depth_mult=1.1, num_experts=8)
    assert small < base
    assert len(deep.blocks) == 23  # ceil(repeats x 1.1) per stage, as EfficientNet-B1
    assert condconv.count_madds(deep) > condconv.count_madds(condconv.create_model("efficientnet_b0", num_experts=8))


def test_dropout_and_drop_path_defaults_and_overrides() -> None:
    b0 = condconv.create_model("efficientnet_b0", width_mult=0.25)
    assert b0.classifier.dropout.p == pytest.approx(0.2)
    assert b0.blocks[-2].drop_path.p == pytest.approx(0.2 * 14 / 16)
    custom = condconv.create_model("efficientnet_b0", width_mult=0.25, dropout=0.5, drop_path_rate=0.0)
    assert custom.classifier.dropout.p == pytest.approx(0.5)
    assert isinstance(custom.blocks[-2].drop_path, torch.nn.Identity)


def test_spec_name_is_short_and_stable() -> None:
    assert ModelSpec(arch="efficientnet_b0", num_experts=8).name == "efficientnet_b0-w1.0-e8-paper"
    assert ModelSpec(arch="mobilenet_v1", width_mult=0.5).name == "mobilenet_v1-w0.5-e0"
    assert ModelSpec(arch="mobilenet_v1", width_mult=0.75, num_experts=4, placement="last:3").name == (
        "mobilenet_v1-w0.75-e4-last3"
    )
    assert ModelSpec(arch="resnet50", num_experts=2, placement=[14, 15, "fc"]).name == "resnet50-w1.0-e2-b14.15.fc"
    model = condconv.create_model(ModelSpec(arch="resnet50", num_experts=8, width_mult=0.25))
    assert model.spec.name == "resnet50-w0.25-e8-paper"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(arch="vgg16"), r"unknown arch 'vgg16'.*mobilenet_v1"),
        (dict(arch="mobilenet_v1", num_experts=-1), r"num_experts=-1.*>= 0"),
        (dict(arch="mobilenet_v1", width_mult=0), r"width_mult=0.*> 0"),
        (dict(arch="mobilenet_v1", width_mult=-0.5), r"width_mult=-0.5"),
        (dict(arch="mobilenet_v1", num_experts=4, placement=[3, 13]), r"block 13.*0\.\.12"),
        (dict(arch="mobilenet_v1", num_experts=4, placement="last:20"), r"last:20.*13"),
        (dict(arch="mobilenet_v1", num_experts=4, placement="first:2"), r"'first:2'.*paper"),
        (dict(arch="resnet50", num_experts=4, placement=["head"]), r"'head' does not exist.*fc"),
        (dict(arch="mobilenet_v1", dropout=1.5), r"dropout=1.5"),
        (dict(arch="mobilenet_v1", routing="relu"), r"routing='relu'.*sigmoid"),
    ],
)
def test_bad_input_raises_value_error_before_building(kwargs: dict, match: str, monkeypatch) -> None:
    built = []
    monkeypatch.setattr(CondConv2d, "__init__", lambda *a, **k: built.append(1) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(ValueError, match=match):
        condconv.create_model(kwargs.pop("arch"), **kwargs)
    assert built == []


def test_summary_lists_blocks_with_experts_params_and_madds() -> None:
    model = condconv.create_model("efficientnet_b0", num_experts=8)
    rows = condconv.model_summary(model, 224)
    names = [r.name for r in rows]
    assert names[0] == "stem" and names[-1] == "classifier" and "blocks.15" in names
    cond = {r.name for r in rows if r.condconv}
    assert cond == {f"blocks.{i}" for i in range(8, 16)}
    assert all(r.num_experts == 8 for r in rows if r.condconv)
    assert sum(r.madds for r in rows) == condconv.count_madds(model, 224)
    assert sum(r.params for r in rows) == condconv.count_params(model)
    text = condconv.format_summary(rows)
    assert "| blocks.8 | InvertedResidual | yes | 8 |" in text


def test_condconv_model_learns_a_fixed_batch() -> None:
    """Loss on a fixed small batch falls well below its start in 30 CPU steps."""
    torch.manual_seed(0)
    model = condconv.create_model("mobilenet_v1", width_mult=0.25, num_experts=8, num_classes=10)
    x = torch.randn(16, 3, 32, 32)
    y = torch.arange(16) % 10
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_channels_last_model_matches_contiguous() -> None:
    torch.manual_seed(1)
    model = condconv.create_model("efficientnet_b0", width_mult=0.25, num_experts=4, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    want = model(x)
    got = channels_last_(model)(x.to(memory_format=torch.channels_last))
    assert model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
