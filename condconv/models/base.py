"""`CondConvNet`: the common shape of every backbone (stem -> body blocks -> head -> classifier)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from condconv.layers import CondConv2d, CondLinear, RoutingFn, init_expert_kernels_

__all__ = ["CondConvNet", "FeatureInfo", "init_weights", "channels_last_"]


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map a backbone can return: block ``index`` (``len(blocks)`` = after the head), channels, stride."""

    index: int
    channels: int
    stride: int


class CondConvNet(nn.Module):
    """A classification backbone whose body blocks are indexed by CondConv placements.

    ``blocks[i]`` is body block ``i``; ``head`` (optional) is the final 1x1 conv and
    ``classifier`` the pooled FC. ``block_strides[i]`` is the total stride after block ``i``.
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        head: Optional[nn.Module],
        classifier: nn.Module,
        block_channels: Sequence[int],
        block_strides: Sequence[int],
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head if head is not None else nn.Identity()
        self.classifier = classifier
        self.block_channels = list(block_channels)
        self.block_strides = list(block_strides)
        # Kept apart from the classifier, which a detector replaces.
        self._num_features = int(classifier.in_features)

    @property
    def num_features(self) -> int:
        """Channels entering the classifier (the head's output channels)."""
        return self._num_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Features before pooling: stem, body blocks, head."""
        return self.head(self.blocks(self.stem(x)))

    @property
    def feature_info(self) -> list[FeatureInfo]:
        """Every feature map `forward_features_multiscale` can return: one per body block, then the head output."""
        info = [FeatureInfo(i, c, s) for i, (c, s) in enumerate(zip(self.block_channels, self.block_strides))]
        info.append(FeatureInfo(len(self.block_channels), self.num_features, self.block_strides[-1]))
        return info

    def forward_features_multiscale(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Feature maps after the body blocks at ``indices`` (``len(blocks)``: after the head), in that order.

        Stops after the deepest requested block, so a detector pays only for the layers it uses.
        """
        last = len(self.blocks)
        bad = [i for i in indices if not 0 <= i <= last]
        if bad or not indices:
            raise ValueError(f"feature indices {list(indices)}; expected a non-empty list of ints in [0, {last}]")
        wanted = set(indices)
        found: dict[int, torch.Tensor] = {}
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            if i > max(wanted):
                break
            x = block(x)
            if i in wanted:
                found[i] = x
        if last in wanted:
            found[last] = self.head(x)
        return [found[i] for i in indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes]."""
        return self.classifier(self.forward_features(x))


def init_weights(model: nn.Module, zero_init_last_bn: bool = False) -> None:
    """Initialise as torchvision/timm do: kaiming-normal (fan_out) convs, unit BN, small-normal FC.

    CondConv layers get the same init for each expert, so every expert starts like the static
    layer it replaces.
    """
    conv_init = lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")  # noqa: E731
    # Routing FCs keep PyTorch's default init: a fan-in-scaled start keeps sigmoid routing near 0.5
    # instead of saturating on wide blocks.
    routing_fcs = {id(m.fc) for m in model.modules() if isinstance(m, RoutingFn)}
    for m in model.modules():
        if id(m) in routing_fcs:
            continue
        if isinstance(m, CondConv2d):
            init_expert_kernels_(m.weight, conv_init)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            conv_init(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Linear, CondLinear)):
            # Small logits at the start whatever the class count (torchvision's MobileNet init); a
            # fan-out-scaled uniform init gives large logits, and a slow start, with 10 classes.
            init_expert_kernels_(m.weight, lambda w: nn.init.normal_(w, 0.0, 0.01)) if isinstance(m, CondLinear) else nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if zero_init_last_bn:
        for m in model.modules():
            if hasattr(m, "conv3") and hasattr(m.conv3, "bn"):
                nn.init.zeros_(m.conv3.bn.weight)


def channels_last_(model: nn.Module) -> nn.Module:
    """Put 4-d conv weights in channels_last memory format, in place; returns the model.

    ``model.to(memory_format=torch.channels_last)`` fails on CondConv's 5-d expert weights, so
    only tensors of rank 4 are converted (CondConv mixes its kernels per example anyway).
    """
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 4:
                param.data = param.data.contiguous(memory_format=torch.channels_last)
    return model
