"""CondConv2d / CondLinear / RoutingFn equal their per-example definition, outputs and gradients."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from condconv import CondConv2d, CondLinear, RoutingFn


def reference_condconv(layer: CondConv2d, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """y[b] = conv2d(x[b], sum_e r[b, e] * weight[e]) computed one example at a time."""
    outs = []
    for b in range(x.shape[0]):
        w = (r[b].view(-1, 1, 1, 1, 1) * layer.weight).sum(0)
        bias = (r[b].view(-1, 1) * layer.bias).sum(0) if layer.bias is not None else None
        outs.append(F.conv2d(x[b : b + 1], w, bias, layer.stride, layer.padding, layer.dilation, layer.groups))
    return torch.cat(outs)


def random_case(rng: random.Random) -> dict:
    groups_kind = rng.choice(["regular", "grouped", "depthwise"])
    if groups_kind == "depthwise":
        c = rng.choice([3, 8, 16])
        cin, cout, groups = c, c, c
    elif groups_kind == "grouped":
        groups = rng.choice([2, 4])
        cin, cout = groups * rng.randint(1, 4), groups * rng.randint(1, 4)
    else:
        groups, cin, cout = 1, rng.randint(1, 12), rng.randint(1, 12)
    k = rng.choice([1, 1, 3, 5, (1, 3)])
    return dict(
        in_channels=cin,
        out_channels=cout,
        kernel_size=k,
        stride=rng.choice([1, 2, (2, 1)]),
        padding=rng.choice([0, 1, 2]),
        dilation=rng.choice([1, 1, 2]),
        groups=groups,
        bias=rng.random() < 0.5,
        num_experts=rng.choice([1, 2, 3, 8]),
    )


@pytest.mark.parametrize("seed", range(24))
def test_condconv_matches_per_example_reference(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    case = random_case(rng)
    batch = [1, 2, 5, 17][seed % 4]
    layer = CondConv2d(**case).double()
    size = rng.randint(5, 12)
    x = torch.randn(batch, case["in_channels"], size, size + 1, dtype=torch.double, requires_grad=True)
    r = torch.rand(batch, case["num_experts"], dtype=torch.double, requires_grad=True)

    y = layer(x, r)
    y_ref = reference_condconv(layer, x, r)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(y)
    params = [x, r, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel_size,groups", [(1, 1), (3, 1), (3, 8)])
def test_condconv_float32_within_1e5(kernel_size: int, groups: int) -> None:
    torch.manual_seed(0)
    layer = CondConv2d(8, 16, kernel_size, padding=kernel_size // 2, groups=groups, num_experts=8)
    x = torch.randn(9, 8, 14, 14)
    r = torch.rand(9, 8)
    torch.testing.assert_close(layer(x, r), reference_condconv(layer, x, r), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel_size,groups", [(1, 1), (3, 1), (3, 6)])
def test_one_hot_routing_equals_static_conv(kernel_size: int, groups: int) -> None:
    torch.manual_seed(1)
    layer = CondConv2d(6, 12, kernel_size, stride=2, padding=1, groups=groups, bias=True, num_experts=4)
    x = torch.randn(3, 6, 9, 9)
    for e in range(4):
        r = F.one_hot(torch.full((3,), e), 4).float()
        want = F.conv2d(x, layer.weight[e], layer.bias[e], 2, 1, 1, groups)
        torch.testing.assert_close(layer(x, r), want, atol=1e-5, rtol=1e-5)


def test_channels_last_input_matches_contiguous() -> None:
    torch.manual_seed(2)
    for k, g in [(1, 1), (3, 1), (3, 16)]:
        layer = CondConv2d(16, 16, k, padding=k // 2, groups=g, num_experts=4)
        x = torch.randn(4, 16, 10, 10)
        r = torch.rand(4, 4)
        torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last), r), layer(x, r))


def test_routing_weights_wrong_shape_raise_value_error() -> None:
    layer = CondConv2d(4, 4, 3, padding=1, num_experts=8)
    x = torch.randn(2, 4, 6, 6)
    for bad in (torch.rand(2, 4), torch.rand(3, 8), torch.rand(2, 8, 1)):
        with pytest.raises(ValueError, match="routing_weights has shape"):
            layer(x, bad)
    with pytest.raises(ValueError, match="routing_weights"):
        CondLinear(4, 3, num_experts=2)(torch.randn(2, 4), torch.rand(2, 3))


def test_bad_layer_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="num_experts=0"):
        CondConv2d(4, 4, 3, num_experts=0)
    with pytest.raises(ValueError, match="groups=3"):
        CondConv2d(4, 4, 3, groups=3)
    with pytest.raises(ValueError, match="routing kind 'relu'"):
        RoutingFn(4, 2, kind="relu")


def test_each_expert_initialised_like_the_static_conv() -> None:
    torch.manual_seed(3)
    layer = CondConv2d(64, 64, 3, num_experts=8)
    static = torch.nn.Conv2d(64, 64, 3)
    bound = static.weight.abs().max().item()
    for e in range(8):
        w = layer.weight[e]
        assert w.abs().max().item() <= bound * 1.0001
        # uniform(-b, b) has std b / sqrt(3); each expert on its own, not one shared draw
        assert abs(w.std().item() - static.weight.std().item()) < 0.05 * static.weight.std().item()
    assert not torch.equal(layer.weight[0], layer.weight[1])


def test_condlinear_matches_reference() -> None:
    torch.manual_seed(4)
    layer = CondLinear(10, 7, num_experts=3).double()
    x = torch.randn(5, 10, dtype=torch.double, requires_grad=True)
    r = torch.rand(5, 3, dtype=torch.double, requires_grad=True)
    want = torch.stack(
        [F.linear(x[b], (r[b, :, None, None] * layer.weight).sum(0), (r[b, :, None] * layer.bias).sum(0)) for b in range(5)]
    )
    y = layer(x, r)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    for got, exp in zip(torch.autograd.grad(y, [x, r, layer.weight], g), torch.autograd.grad(want, [x, r, layer.weight], g)):
        torch.testing.assert_close(got, exp)


def test_routing_fn_is_sigmoid_of_pooled_linear() -> None:
    torch.manual_seed(5)
    fn = RoutingFn(6, 4)
    x = torch.randn(3, 6, 5, 5)
    torch.testing.assert_close(fn(x), torch.sigmoid(fn.fc(x.mean((2, 3)))))
    soft = RoutingFn(6, 4, kind="softmax")
    torch.testing.assert_close(soft(x).sum(1), torch.ones(3))


def test_condconv_under_torch_compile_matches_eager() -> None:
    torch.manual_seed(6)
    torch._dynamo.reset()
    layer = CondConv2d(8, 8, 3, padding=1, groups=8, num_experts=4)
    compiled = torch.compile(layer, dynamic=True)
    for batch in (1, 3):
        x, r = torch.randn(batch, 8, 7, 7), torch.rand(batch, 4)
        torch.testing.assert_close(compiled(x, r), layer(x, r), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_unfold_path_matches_reference(seed: int) -> None:
    """The im2col path used under torch.compile equals the definition on random shapes."""
    rng = random.Random(100 + seed)
    torch.manual_seed(seed)
    case = random_case(rng)
    layer = CondConv2d(**case).double()
    x = torch.randn(3, case["in_channels"], 9, 8, dtype=torch.double)
    r = torch.rand(3, case["num_experts"], dtype=torch.double)
    out = layer._forward_unfold(x, layer.mixed_kernels(r))
    if layer.bias is not None:
        out = out + (r @ layer.bias)[:, :, None, None]
    torch.testing.assert_close(out, reference_condconv(layer, x, r))
