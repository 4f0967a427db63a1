"""Routing options (sigmoid, softmax, annealed softmax; per-block or per-layer) keep CondConv exact."""
from __future__ import annotations

import pytest
import torch

import condconv
from condconv import CondConv2d, CondLinear, LayerRouted, RoutingFn
from condconv.blocks import Bottleneck, ConvFactory
from condconv.madds import madds_by_module
from condconv.routing import annealed_temperature, routing_modules, set_routing_temperature
from tests.test_layers import reference_condconv

KINDS = [("sigmoid", 1.0), ("softmax", 1.0), ("softmax_anneal", 30.0), ("softmax_anneal", 1.0)]
LAYERS = [  # (in, out, kernel, stride, padding, groups, bias): pointwise, 3x3 strided, depthwise
    (8, 12, 1, 1, 0, 1, False),
    (6, 4, 3, 2, 1, 1, True),
    (8, 8, 3, 1, 1, 8, False),
]


def _grads_match(y: torch.Tensor, y_ref: torch.Tensor, params: list[torch.Tensor]) -> None:
    g = torch.randn_like(y)
    # retain_graph: y and y_ref may share the routing subgraph.
    got_all = torch.autograd.grad(y, params, g, retain_graph=True)
    for got, want in zip(got_all, torch.autograd.grad(y_ref, params, g)):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("kind,temperature", KINDS)
@pytest.mark.parametrize("case", LAYERS)
def test_block_routing_matches_the_per_example_reference(kind: str, temperature: float, case: tuple) -> None:
    torch.manual_seed(0)
    cin, cout, k, stride, pad, groups, bias = case
    layer = CondConv2d(cin, cout, k, stride, pad, groups=groups, bias=bias, num_experts=4).double()
    routing = RoutingFn(cin, 4, kind, temperature).double()
    x = torch.randn(5, cin, 9, 9, dtype=torch.double, requires_grad=True)
    r = routing(x)
    assert r.shape == (5, 4) and ((r > 0) & (r < 1)).all()
    if kind != "sigmoid":
        torch.testing.assert_close(r.sum(1), torch.ones(5, dtype=torch.double))
    y, y_ref = layer(x, r), reference_condconv(layer, x, r)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    _grads_match(y, y_ref, [x, layer.weight, routing.fc.weight, routing.fc.bias])


@pytest.mark.parametrize("kind,temperature", KINDS)
@pytest.mark.parametrize("case", LAYERS)
def test_layer_routing_matches_the_per_example_reference(kind: str, temperature: float, case: tuple) -> None:
    torch.manual_seed(1)
    cin, cout, k, stride, pad, groups, bias = case
    routed = LayerRouted(CondConv2d(cin, cout, k, stride, pad, groups=groups, bias=bias, num_experts=4),
                         kind, temperature).double()
    x = torch.randn(3, cin, 8, 7, dtype=torch.double, requires_grad=True)
    y = routed(x)
    y_ref = reference_condconv(routed.layer, x, routed.routing(x))
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    _grads_match(y, y_ref, [x, routed.layer.weight, routed.routing.fc.weight])


def test_layer_routed_linear_and_refusals() -> None:
    torch.manual_seed(2)
    routed = LayerRouted(CondLinear(6, 5, num_experts=3), "softmax").double()
    x = torch.randn(4, 6, dtype=torch.double)
    r = routed.routing(x)
    want = torch.stack([(r[b].view(-1, 1, 1) * routed.layer.weight).sum(0) @ x[b] + r[b] @ routed.layer.bias
                        for b in range(4)])
    torch.testing.assert_close(routed(x), want)
    with pytest.raises(ValueError, match="computes its own routing"):
        routed(x, r)
    with pytest.raises(ValueError, match="wraps a CondConv2d or CondLinear"):
        LayerRouted(torch.nn.Conv2d(3, 3, 1))


def test_annealed_temperature_schedule_and_setting_it() -> None:
    assert annealed_temperature(0, 30.0, 10) == 30.0
    assert annealed_temperature(5, 30.0, 10) == 15.5
    assert annealed_temperature(10, 30.0, 10) == annealed_temperature(99, 30.0, 10) == 1.0
    assert annealed_temperature(0, 30.0, 0) == 1.0
    for bad in [dict(start=0.5, anneal_epochs=10), dict(start=30.0, anneal_epochs=-1)]:
        with pytest.raises(ValueError, match="routing"):
            annealed_temperature(0, **bad)

    model = condconv.create_model("mobilenet_v1", width_mult=0.25, num_experts=4, resolution=32,
                                  num_classes=10, routing="softmax_anneal", routing_temperature=30.0)
    fns = routing_modules(model)
    assert len(fns) == 14 and all(float(f.temperature) == 30.0 for f in fns.values())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    hot = fns["blocks.12.routing"](torch.randn(2, fns["blocks.12.routing"].in_channels) * 10)
    assert (hot - 0.25).abs().max() < 0.1  # T=30: nearly uniform over 4 experts
    assert set_routing_temperature(model, 2.0) == 14
    # The temperature is a buffer: saved in checkpoints and restored with the weights.
    state = model.state_dict()
    assert float(state["blocks.0.routing.temperature"]) == 2.0
    fresh = condconv.create_model(model.spec)
    fresh.load_state_dict(state)
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    # Other kinds carry no temperature state and are not touched by the helper.
    plain = condconv.create_model("mobilenet_v1", width_mult=0.25, num_experts=4, resolution=32, routing="softmax")
    assert set_routing_temperature(plain, 2.0) == 0
    assert not any(k.endswith("temperature") for k in plain.state_dict())
    with pytest.raises(ValueError, match="applies to"):
        RoutingFn(8, 4, "sigmoid", temperature=2.0)
    with pytest.raises(ValueError, match="temperature=0"):
        fns["blocks.0.routing"].set_temperature(0)


@pytest.mark.parametrize("arch,routing,scope", [
    ("mobilenet_v2", "sigmoid", "layer"),  # InvertedResidual blocks and a CondConv head
    ("mobilenet_v1", "softmax", "block"),
    ("mobilenet_v1", "softmax_anneal", "layer"),
])
def test_models_train_with_every_option(arch: str, routing: str, scope: str) -> None:
    torch.manual_seed(3)
    spec = condconv.ModelSpec(arch=arch, width_mult=0.25, num_experts=2, placement="last:2",
                              resolution=32, num_classes=10, routing=routing, routing_scope=scope)
    model = condconv.create_model(spec)
    out = model(torch.randn(3, 3, 32, 32))
    out.logsumexp(1).sum().backward()
    fns = routing_modules(model)
    assert fns and all(f.kind == routing and f.fc.weight.grad is not None for f in fns.values())
    assert any(isinstance(m, LayerRouted) for m in model.modules()) == (scope == "layer")
    # MADDs count every routing FC (an nn.Linear) and every CondConv layer.
    counts = madds_by_module(model, resolution=32)
    assert all(f"{name}.fc" in counts for name in fns)


def test_per_layer_routing_in_a_bottleneck_and_its_cost() -> None:
    block = Bottleneck(16, 4, stride=2, factory=ConvFactory(4, scope="layer"))
    assert block.routing is None and isinstance(block.downsample.conv, LayerRouted)
    assert len(routing_modules(block)) == 4  # conv1, conv2, conv3, shortcut
    x = torch.randn(2, 16, 8, 8)
    assert block(x).shape == (2, 16, 4, 4)
    shared = condconv.create_model("mobilenet_v1", width_mult=0.25, num_experts=4, resolution=32)
    per_layer = condconv.create_model("mobilenet_v1", width_mult=0.25, num_experts=4, resolution=32,
                                      routing_scope="layer")
    extra = sum(f.in_channels * f.num_experts for n, f in routing_modules(per_layer).items()) - sum(
        f.in_channels * f.num_experts for f in routing_modules(shared).values())
    assert condconv.count_madds(per_layer, 32) - condconv.count_madds(shared, 32) == extra > 0


def test_static_models_are_unchanged_by_routing_options() -> None:
    base = condconv.create_model("mobilenet_v1", width_mult=0.25, resolution=32)
    for kw in [dict(routing="softmax"), dict(routing_scope="layer"), dict(routing="softmax_anneal")]:
        other = condconv.create_model("mobilenet_v1", width_mult=0.25, resolution=32, **kw)
        assert other.spec.name == base.spec.name == "mobilenet_v1-w0.25-e0"
        assert list(other.state_dict()) == list(base.state_dict()) and not routing_modules(other)


def test_names_include_the_option_and_bad_values_raise() -> None:
    spec = condconv.ModelSpec(arch="mobilenet_v1", num_experts=8)
    assert spec.name == "mobilenet_v1-w1.0-e8-paper"
    assert spec.replace(routing="softmax").name == "mobilenet_v1-w1.0-e8-paper-softmax"
    assert spec.replace(routing_scope="layer").name == "mobilenet_v1-w1.0-e8-paper-per_layer"
    assert spec.replace(routing="softmax_anneal").name == "mobilenet_v1-w1.0-e8-paper-softmax_anneal30x10"
    assert (spec.replace(routing="softmax_anneal", routing_temperature=10, routing_anneal_epochs=5,
                         routing_scope="layer").name
            == "mobilenet_v1-w1.0-e8-paper-softmax_anneal10x5-per_layer")
    # Schedule fields do not change a model that does not anneal, nor its name.
    assert spec.replace(routing_temperature=5.0).name == spec.name
    for field, value in [("routing", "relu"), ("routing_scope", "expert"), ("routing_temperature", 0.5),
                         ("routing_temperature", "hot"), ("routing_anneal_epochs", -1),
                         ("routing_anneal_epochs", 2.5)]:
        with pytest.raises(ValueError, match=f"{field}="):
            spec.replace(**{field: value})
    with pytest.raises(ValueError, match="routing scope 'x'"):
        ConvFactory(2, scope="x")
