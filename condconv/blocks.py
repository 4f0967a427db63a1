"""Building blocks shared by all backbones. Each takes a `ConvFactory`, so the static and the
CondConv variant of a block are the same code: the factory decides what a conv is.

A CondConv block owns one `RoutingFn` computed from the block's input and shared by all its
CondConv layers, as in the paper's reference code (with a factory of ``scope="layer"`` each
CondConv layer routes on its own input instead, see `condconv.routing.LayerRouted`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn
from torchvision.ops import SqueezeExcitation, StochasticDepth

from condconv.layers import CondConv2d, CondLinear, RoutingFn
from condconv.routing import ROUTING_SCOPES, LayerRouted

if TYPE_CHECKING:
    from condconv.spec import ModelSpec

__all__ = [
    "ConvFactory",
    "STATIC",
    "apply_conv",
    "make_divisible",
    "ConvBnAct",
    "DepthwiseSeparable",
    "InvertedResidual",
    "Bottleneck",
    "ConvHead",
    "Classifier",
]

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[[], nn.Module]


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round channels to a multiple of ``divisor`` without going more than 10% down (as MobileNet/timm)."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


@dataclass(frozen=True)
class ConvFactory:
    """Makes the convs of one block: `nn.Conv2d` when ``num_experts == 0``, else `CondConv2d`.

    ``routing`` is the `RoutingFn` kind and ``temperature`` its starting softmax temperature;
    ``scope="layer"`` wraps every CondConv layer in `LayerRouted` (its own routing) and gives the
    block no shared `RoutingFn`.
    """

    num_experts: int = 0
    routing: str = "sigmoid"
    scope: str = "block"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.scope not in ROUTING_SCOPES:
            raise ValueError(f"routing scope {self.scope!r} is not one of {ROUTING_SCOPES}")

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ConvFactory:
        """The CondConv factory of a `ModelSpec` (its experts and routing options)."""
        temperature = spec.routing_temperature if spec.routing == "softmax_anneal" else 1.0
        return cls(spec.num_experts, spec.routing, spec.routing_scope, temperature)

    @property
    def conditional(self) -> bool:
        """True when this factory makes CondConv layers."""
        return self.num_experts > 0

    def conv(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, bias: bool = False
    ) -> nn.Module:
        """A 'same'-padded conv (symmetric padding (k-1)//2, as torchvision's models)."""
        padding = (kernel_size - 1) // 2
        if self.conditional:
            return self._routed(CondConv2d(
                in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias,
                num_experts=self.num_experts,
            ))
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)

    def linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        """A fully connected layer: `nn.Linear` or `CondLinear`."""
        if self.conditional:
            return self._routed(CondLinear(in_features, out_features, bias=bias, num_experts=self.num_experts))
        return nn.Linear(in_features, out_features, bias=bias)

    def _routed(self, layer: nn.Module) -> nn.Module:
        return LayerRouted(layer, self.routing, self.temperature) if self.scope == "layer" else layer

    def routing_fn(self, in_channels: int) -> Optional[RoutingFn]:
        """The block's shared routing function, or None for a static block or per-layer routing."""
        if not self.conditional or self.scope == "layer":
            return None
        return RoutingFn(in_channels, self.num_experts, self.routing, self.temperature)


STATIC = ConvFactory()


def apply_conv(conv: nn.Module, x: torch.Tensor, routing_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Call a conv or linear layer, passing routing weights only to conditional ones."""
    if isinstance(conv, (CondConv2d, CondLinear)):
        return conv(x, routing_weights)
    return conv(x)


def _routing(routing_fn: Optional[RoutingFn], x: torch.Tensor) -> Optional[torch.Tensor]:
    return routing_fn(x) if routing_fn is not None else None


class ConvBnAct(nn.Module):
    """Conv -> BatchNorm -> activation (activation optional)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        factory: ConvFactory = STATIC,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: Optional[ActLayer] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.conv = factory.conv(in_channels, out_channels, kernel_size, stride, groups)
        self.bn = norm_layer(out_channels)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor, routing_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Apply conv (with the block's routing weights if conditional), norm and activation."""
        return self.act(self.bn(apply_conv(self.conv, x, routing_weights)))


class _Residual(nn.Module):
    """Shared residual logic: optional stochastic depth on the branch when the shapes allow a skip."""

    def __init__(self, use_skip: bool, drop_path_rate: float) -> None:
        super().__init__()
        self.use_skip = use_skip
        self.drop_path = StochasticDepth(drop_path_rate, "row") if use_skip and drop_path_rate > 0 else nn.Identity()

    def residual(self, shortcut: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return shortcut + self.drop_path(branch) if self.use_skip else branch


class DepthwiseSeparable(_Residual):
    """Depthwise kxk conv -> [SE] -> pointwise 1x1 conv (MobileNetV1 block; MnasNet/EfficientNet DS block)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_size: int = 3,
        factory: ConvFactory = STATIC,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
        se_ratio: float = 0.0,
        pw_act: bool = True,
        skip: bool = False,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(skip and stride == 1 and in_channels == out_channels, drop_path_rate)
        self.routing = factory.routing_fn(in_channels)
        self.conv_dw = ConvBnAct(in_channels, in_channels, kernel_size, stride, in_channels, factory, norm_layer, act_layer)
        self.se = (
            SqueezeExcitation(in_channels, max(1, int(in_channels * se_ratio)), act_layer)
            if se_ratio > 0
            else nn.Identity()
        )
        self.conv_pw = ConvBnAct(in_channels, out_channels, 1, 1, 1, factory, norm_layer, act_layer if pw_act else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block; CondConv layers share one routing vector computed from ``x``."""
        r = _routing(self.routing, x)
        out = self.conv_pw(self.se(self.conv_dw(x, r)), r)
        return self.residual(x, out)


class InvertedResidual(_Residual):
    """MBConv: expand 1x1 -> depthwise kxk -> [SE] -> project 1x1 (MobileNetV2, MnasNet, EfficientNet)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_size: int = 3,
        expand_ratio: float = 6.0,
        factory: ConvFactory = STATIC,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
        se_ratio: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(stride == 1 and in_channels == out_channels, drop_path_rate)
        mid = int(round(in_channels * expand_ratio))
        self.routing = factory.routing_fn(in_channels)
        self.conv_pw = (
            ConvBnAct(in_channels, mid, 1, 1, 1, factory, norm_layer, act_layer) if mid != in_channels else None
        )
        self.conv_dw = ConvBnAct(mid, mid, kernel_size, stride, mid, factory, norm_layer, act_layer)
        # SE width is relative to the block input, as in MnasNet/EfficientNet.
        self.se = (
            SqueezeExcitation(mid, max(1, int(in_channels * se_ratio)), act_layer) if se_ratio > 0 else nn.Identity()
        )
        self.conv_pwl = ConvBnAct(mid, out_channels, 1, 1, 1, factory, norm_layer, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block; CondConv layers share one routing vector computed from ``x``."""
        r = _routing(self.routing, x)
        out = self.conv_pw(x, r) if self.conv_pw is not None else x
        out = self.conv_pwl(self.se(self.conv_dw(out, r)), r)
        return self.residual(x, out)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv); in a CondConv block the shortcut conv is CondConv too."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        factory: ConvFactory = STATIC,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.routing = factory.routing_fn(in_channels)
        self.conv1 = ConvBnAct(in_channels, planes, 1, 1, 1, factory, norm_layer, act_layer)
        self.conv2 = ConvBnAct(planes, planes, 3, stride, 1, factory, norm_layer, act_layer)
        self.conv3 = ConvBnAct(planes, out_channels, 1, 1, 1, factory, norm_layer, None)
        self.downsample = (
            ConvBnAct(in_channels, out_channels, 1, stride, 1, factory, norm_layer, None)
            if stride != 1 or in_channels != out_channels
            else None
        )
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block; CondConv layers share one routing vector computed from ``x``."""
        r = _routing(self.routing, x)
        shortcut = self.downsample(x, r) if self.downsample is not None else x
        out = self.conv3(self.conv2(self.conv1(x, r), r), r)
        return self.act(out + shortcut)


class ConvHead(nn.Module):
    """The final 1x1 conv that widens features before pooling (MobileNetV2, MnasNet, EfficientNet)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        factory: ConvFactory = STATIC,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.ReLU,
    ) -> None:
        super().__init__()
        self.routing = factory.routing_fn(in_channels)
        self.conv = ConvBnAct(in_channels, out_channels, 1, 1, 1, factory, norm_layer, act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the head conv (routed on its own input when conditional)."""
        return self.conv(x, _routing(self.routing, x))


class Classifier(nn.Module):
    """Global average pool -> dropout -> FC; a CondConv FC routes on the pooled features."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0, factory: ConvFactory = STATIC) -> None:
        super().__init__()
        self.in_features = in_features
        self.routing = factory.routing_fn(in_features)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = factory.linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] from features [B, C, H, W]."""
        pooled = x.mean(dim=(2, 3))
        return apply_conv(self.fc, self.dropout(pooled), _routing(self.routing, pooled))
