"""Routing options beyond the paper's per-block sigmoid: per-layer routing and annealed softmax.

- Scope: ``"block"`` (the paper: one `RoutingFn` per block, shared by its CondConv layers) or
  ``"layer"``: every CondConv layer is a `LayerRouted` layer that routes on its own input.
- Temperature annealing (DynamicConv, Chen et al. 2020): ``softmax(logits / T)`` with ``T`` going
  linearly from a start value (30 there) down to 1 over the first epochs; a near-uniform mix of
  the experts early on lets every expert receive gradient before routing sharpens. The schedule
  is `annealed_temperature`; the training loop applies it with `set_routing_temperature`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from condconv.layers import CondConv2d, CondLinear, RoutingFn

__all__ = [
    "ROUTING_SCOPES",
    "LayerRouted",
    "annealed_temperature",
    "set_routing_temperature",
    "routing_modules",
]

ROUTING_SCOPES = ("block", "layer")


class LayerRouted(nn.Module):
    """A CondConv layer with its own `RoutingFn` computed from that layer's input (per-layer routing).

    Wraps `CondConv2d` or `CondLinear` unchanged (``self.layer``), so their equivalence and MADD
    rules still apply; the routing FC is an `nn.Linear` (``self.routing.fc``) and counted as one.
    """

    def __init__(
        self, layer: Union[CondConv2d, CondLinear], kind: str = "sigmoid", temperature: float = 1.0
    ) -> None:
        super().__init__()
        if not isinstance(layer, (CondConv2d, CondLinear)):
            raise ValueError(f"LayerRouted wraps a CondConv2d or CondLinear, not {type(layer).__name__}")
        in_channels = layer.in_channels if isinstance(layer, CondConv2d) else layer.in_features
        self.routing = RoutingFn(in_channels, layer.num_experts, kind, temperature)
        self.layer = layer

    @property
    def num_experts(self) -> int:
        """Experts of the wrapped layer."""
        return self.layer.num_experts

    def forward(self, x: torch.Tensor, routing_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Route on ``x`` and apply the wrapped layer; ``routing_weights`` (if given) must be None."""
        if routing_weights is not None:
            # A block passing its shared routing here would silently be ignored: refuse instead.
            raise ValueError("LayerRouted computes its own routing weights; got routing_weights from the caller")
        return self.layer(x, self.routing(x))


def annealed_temperature(epoch: float, start: float, anneal_epochs: int) -> float:
    """Softmax temperature at ``epoch``: linear from ``start`` at epoch 0 to 1 at ``anneal_epochs``, then 1."""
    if not start >= 1.0:
        raise ValueError(f"routing temperature start={start!r}; expected a number >= 1")
    if isinstance(anneal_epochs, bool) or not isinstance(anneal_epochs, int) or anneal_epochs < 0:
        raise ValueError(f"routing anneal_epochs={anneal_epochs!r}; expected an int >= 0")
    if anneal_epochs == 0 or epoch >= anneal_epochs:
        return 1.0
    return float(start + (1.0 - start) * max(epoch, 0.0) / anneal_epochs)


def routing_modules(model: nn.Module) -> dict[str, RoutingFn]:
    """Every `RoutingFn` of ``model`` by module path (``blocks.12.routing``), in definition order (= depth)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutingFn)}


def set_routing_temperature(model: nn.Module, temperature: float) -> int:
    """Set the temperature of every annealed-softmax `RoutingFn` of ``model``; returns how many were set."""
    fns = [m for m in routing_modules(model).values() if m.kind == "softmax_anneal"]
    for fn in fns:
        fn.set_temperature(temperature)
    return len(fns)
