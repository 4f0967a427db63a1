"""`ModelSpec`: the full, validated description of a model; the one input of `create_model`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Union

from condconv.layers import ROUTING_KINDS
from condconv.placement import check_placement, placement_name
from condconv.routing import ROUTING_SCOPES

__all__ = ["ModelSpec"]


@dataclass
class ModelSpec:
    """What to build: architecture, scaling, CondConv experts and placement, head size.

    ``num_experts=0`` is the static model. ``dropout`` and ``drop_path_rate`` default (None) to the
    architecture's own values. Routing: ``routing`` is the `RoutingFn` kind (``sigmoid``,
    ``softmax``, ``softmax_anneal``), ``routing_scope`` ``block`` (one per block, the paper) or
    ``layer`` (one per CondConv layer); ``softmax_anneal`` lowers its temperature linearly from
    ``routing_temperature`` to 1 over the first ``routing_anneal_epochs`` epochs (ignored by the
    other kinds). Invalid fields raise ValueError when the spec is made, before any
    module is built.
    """

    arch: str
    width_mult: float = 1.0
    depth_mult: float = 1.0
    num_experts: int = 0
    placement: Union[str, List[Union[int, str]]] = "paper"
    resolution: int = 224
    num_classes: int = 1000
    dropout: Optional[float] = None
    drop_path_rate: Optional[float] = None
    routing: str = "sigmoid"
    routing_scope: str = "block"
    routing_temperature: float = 30.0
    routing_anneal_epochs: int = 10

    def __post_init__(self) -> None:
        from condconv.models.registry import list_models

        archs = list_models()
        if self.arch not in archs:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {archs}")
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ValueError(f"num_experts={self.num_experts!r}; expected an int >= 0 (0 = static model)")
        for name in ("width_mult", "depth_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r}; expected a number > 0")
            setattr(self, name, float(value))
        for name in ("resolution", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected an int >= 1")
        for name in ("dropout", "drop_path_rate"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name}={value!r}; expected a number in [0, 1) or null for the arch default")
        if self.routing not in ROUTING_KINDS:
            raise ValueError(f"routing={self.routing!r}; expected one of {list(ROUTING_KINDS)}")
        if self.routing_scope not in ROUTING_SCOPES:
            raise ValueError(f"routing_scope={self.routing_scope!r}; expected one of {list(ROUTING_SCOPES)}")
        t = self.routing_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 1.0:
            raise ValueError(f"routing_temperature={t!r}; expected a number >= 1 (the softmax_anneal start)")
        self.routing_temperature = float(t)
        n = self.routing_anneal_epochs
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"routing_anneal_epochs={n!r}; expected an int >= 0")
        if isinstance(self.placement, tuple):
            self.placement = list(self.placement)
        check_placement(self.placement)

    @property
    def is_condconv(self) -> bool:
        """True when the model has CondConv layers (experts > 0 and a non-empty placement)."""
        return self.num_experts > 0 and self.placement != "none"

    @property
    def name(self) -> str:
        """Short stable name, e.g. ``efficientnet_b0-w1.0-e8-paper`` (static: ``mobilenet_v1-w0.5-e0``)."""
        parts = [self.arch, f"w{self.width_mult:g}" if self.width_mult % 1 else f"w{self.width_mult:.1f}"]
        if self.depth_mult != 1.0:
            parts.append(f"d{self.depth_mult:g}")
        parts.append(f"e{self.num_experts}")
        if self.num_experts > 0:
            parts.append(placement_name(self.placement))
            if self.routing == "softmax_anneal":
                parts.append(f"softmax_anneal{self.routing_temperature:g}x{self.routing_anneal_epochs}")
            elif self.routing != "sigmoid":
                parts.append(self.routing)
            if self.routing_scope != "block":
                parts.append(f"per_{self.routing_scope}")
        return "-".join(parts)

    def replace(self, **changes: object) -> "ModelSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
