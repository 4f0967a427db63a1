"""CondConv layers: `CondConv2d`, `CondLinear` and the per-block `RoutingFn`.

A CondConv layer holds ``num_experts`` kernels and convolves each example with its own mix
``sum_e r[b, e] * W_e`` (Yang et al., 2019). Mixing the kernels first and running one
convolution per example costs the conv plus ``num_experts x kernel size`` multiply-adds,
instead of ``num_experts`` convolutions.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from condconv.condconv_paths import PATHS, POLICIES, condconv2d, layer_geometry, unfold_conv

__all__ = ["RoutingFn", "CondConv2d", "CondLinear", "ROUTING_KINDS", "init_expert_kernels_"]

# "softmax_anneal": softmax whose temperature the training loop lowers over the first epochs
# (DynamicConv, Chen et al. 2020); see `condconv.routing.annealed_temperature`.
ROUTING_KINDS = ("sigmoid", "softmax", "softmax_anneal")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _check_routing(routing_weights: torch.Tensor, batch: int, num_experts: int) -> None:
    if routing_weights.dim() != 2 or routing_weights.shape[0] != batch or routing_weights.shape[1] != num_experts:
        raise ValueError(
            f"routing_weights has shape {tuple(routing_weights.shape)}; expected [batch={batch}, "
            f"num_experts={num_experts}]"
        )


class RoutingFn(nn.Module):
    """Example-dependent routing weights ``r = sigmoid(GlobalAvgPool(x) @ W + b)``, shape [B, num_experts].

    One per block, shared by all CondConv layers of that block, as in the paper's reference code.
    ``kind="softmax"`` is offered for comparison (the paper found sigmoid better), and
    ``kind="softmax_anneal"``: ``softmax(logits / temperature)`` with a ``temperature`` that the
    training loop lowers (`condconv.set_routing_temperature`), starting at ``temperature``.
    """

    def __init__(self, in_channels: int, num_experts: int, kind: str = "sigmoid", temperature: float = 1.0) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} for RoutingFn; expected >= 1")
        if kind not in ROUTING_KINDS:
            raise ValueError(f"routing kind {kind!r} is not one of {ROUTING_KINDS}")
        _check_temperature(temperature, kind)
        self.in_channels = in_channels
        self.num_experts = num_experts
        self.kind = kind
        self.fc = nn.Linear(in_channels, num_experts)
        if kind == "softmax_anneal":
            # A buffer, so a checkpoint keeps the temperature the model was last trained at and an
            # evaluation of it routes as training did.
            self.register_buffer("temperature", torch.tensor(float(temperature)))
        else:
            self.temperature = float(temperature)

    def set_temperature(self, temperature: float) -> None:
        """Set the softmax temperature (softmax kinds only)."""
        _check_temperature(temperature, self.kind)
        if isinstance(self.temperature, torch.Tensor):
            self.temperature.fill_(float(temperature))
        else:
            self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights [B, num_experts] from a [B, C, H, W] (or already pooled [B, C]) input."""
        pooled = x.mean(dim=(2, 3)) if x.dim() == 4 else x
        logits = self.fc(pooled)
        if self.kind == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits / self.temperature, dim=1)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, num_experts={self.num_experts}, kind={self.kind}"
        if self.kind != "sigmoid":
            s += f", temperature={float(self.temperature):g}"
        return s


def _check_temperature(temperature: float, kind: str) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"routing temperature={temperature!r}; expected a number > 0")
    if kind == "sigmoid" and temperature != 1.0:
        raise ValueError(
            f"routing temperature={temperature!r} with kind 'sigmoid'; a temperature applies to "
            f"{[k for k in ROUTING_KINDS if k != 'sigmoid']} only"
        )


def init_expert_kernels_(weight: torch.Tensor, init_fn: Callable[[torch.Tensor], object]) -> None:
    """Apply ``init_fn`` to each expert's kernel, so every expert starts like the static layer it replaces."""
    with torch.no_grad():
        for expert in weight:
            init_fn(expert)


class CondConv2d(nn.Module):
    """Conditionally parameterized 2-d convolution: ``y[b] = conv(x[b], sum_e r[b, e] * weight[e])``.

    ``weight`` has shape [num_experts, out, in // groups, kh, kw]; ``forward(x, routing_weights)``
    takes routing weights of shape [B, num_experts] (see `RoutingFn`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        num_experts: int = 8,
        path: str = "auto",
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} for CondConv2d; expected >= 1 (use nn.Conv2d for 0)")
        if path not in POLICIES + PATHS:
            raise ValueError(f"CondConv2d path {path!r} is not one of {POLICIES + PATHS}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.num_experts = num_experts
        # Execution path (see condconv.condconv_paths): "auto" (shape rules), "measure" (timed once per
        # shape, cached per process) or a path name to force one. Any path computes the same function.
        self.path = path
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise each expert exactly as `nn.Conv2d.reset_parameters` initialises its kernel."""
        init_expert_kernels_(self.weight, lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)))
        if self.bias is not None:
            fan_in = self.weight[0].numel() // self.out_channels
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def is_pointwise(self) -> bool:
        """True for a 1x1, stride-1, ungrouped, unpadded conv, which runs as a batched matmul."""
        return (
            self.kernel_size == (1, 1)
            and self.stride == (1, 1)
            and self.groups == 1
            and self.padding in ((0, 0), "valid", "same")
        )

    def mixed_kernels(self, routing_weights: torch.Tensor) -> torch.Tensor:
        """Per-example kernels [B, out, in // groups, kh, kw] = routing_weights @ weight."""
        batch = routing_weights.shape[0]
        mixed = torch.matmul(routing_weights, self.weight.reshape(self.num_experts, -1))
        return mixed.reshape(batch, *self.weight.shape[1:])

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """Convolve each example of ``x`` [B, C, H, W] with its own mix of the expert kernels."""
        batch, channels, height, width = x.shape
        if channels != self.in_channels:
            raise ValueError(f"input has {channels} channels; CondConv2d expects {self.in_channels}")
        _check_routing(routing_weights, batch, self.num_experts)
        routing_weights = routing_weights.to(self.weight.dtype)
        geom, pre_pad = layer_geometry(self)
        if pre_pad is not None:
            x = F.pad(x, pre_pad)
        # The path (grouped conv, bmm, expert outputs, ...) is chosen by shape; see condconv_paths.
        out = condconv2d(x, routing_weights, self.weight, geom, self.path)
        if self.bias is not None:
            out = out + torch.matmul(routing_weights, self.bias)[:, :, None, None]
        return out

    def _forward_unfold(self, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """Per-example conv as im2col + batched matmul (the "unfold" path, given mixed kernels)."""
        geom, pre_pad = layer_geometry(self)
        return unfold_conv(F.pad(x, pre_pad) if pre_pad is not None else x, kernels, geom)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, num_experts={self.num_experts}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.path != "auto":
            s += f", path={self.path}"
        return s


class CondLinear(nn.Module):
    """Conditionally parameterized fully connected layer (a 1x1 CondConv on pooled features).

    ``weight`` has shape [num_experts, out, in]; ``forward(x [B, in], routing_weights [B, E])``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, num_experts: int = 8) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} for CondLinear; expected >= 1 (use nn.Linear for 0)")
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise each expert as `nn.Linear.reset_parameters` does."""
        init_expert_kernels_(self.weight, lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """Apply each example's own mix of the expert matrices to ``x`` [B, in]."""
        batch = x.shape[0]
        _check_routing(routing_weights, batch, self.num_experts)
        routing_weights = routing_weights.to(self.weight.dtype)
        mixed = torch.matmul(routing_weights, self.weight.reshape(self.num_experts, -1))
        out = torch.bmm(mixed.reshape(batch, self.out_features, self.in_features), x.unsqueeze(-1)).squeeze(-1)
        if self.bias is not None:
            out = out + torch.matmul(routing_weights, self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, num_experts={self.num_experts}, bias={self.bias is not None}"
