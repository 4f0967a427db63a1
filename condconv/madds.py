"""Multiply-add (MADD) and parameter counts, as the paper reports them.

Counted per image (batch 1, eval mode): convolutions, fully connected layers, and for each
CondConv layer its conv plus the mixing of its expert kernels (``num_experts x kernel size``).
The routing FC is an ordinary Linear and counted as one. Element-wise ops are not counted.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from condconv.layers import CondConv2d, CondLinear

__all__ = ["count_madds", "count_params", "madds_by_module", "layer_madds"]

_COUNTED = (nn.Conv2d, nn.Linear, CondConv2d, CondLinear)


def layer_madds(module: nn.Module, output: torch.Tensor) -> int:
    """MADDs of one conv/linear/CondConv layer for one example, given its output."""
    per_example_out = output[0].numel()
    if isinstance(module, CondConv2d):
        kernel = module.weight[0].numel()
        mixing = module.num_experts * (kernel + (module.out_channels if module.bias is not None else 0))
        return per_example_out * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1] + mixing
    if isinstance(module, CondLinear):
        matrix = module.weight[0].numel()
        mixing = module.num_experts * (matrix + (module.out_features if module.bias is not None else 0))
        return per_example_out * module.in_features + mixing
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_example_out * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_example_out * module.in_features
    raise TypeError(f"no MADD rule for {type(module).__name__}")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def madds_by_module(model: nn.Module, resolution: int = 224, in_channels: int = 3) -> dict[str, int]:
    """MADDs of every counted layer, by qualified module name, for one ``resolution``-sized image."""
    if resolution < 1:
        raise ValueError(f"resolution={resolution}; expected an int >= 1")
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _COUNTED):

            def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor, name: str = name) -> None:
                counts[name] = counts.get(name, 0) + layer_madds(mod, out)

            handles.append(module.register_forward_hook(hook))
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(1, in_channels, resolution, resolution, device=device)
        with _eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return counts


def count_madds(model: nn.Module, resolution: int = 224, in_channels: int = 3) -> int:
    """Multiply-adds per image at ``resolution`` x ``resolution`` (eval mode, batch 1)."""
    return sum(madds_by_module(model, resolution, in_channels).values())


def count_params(model: nn.Module) -> int:
    """Number of parameters (all experts included)."""
    return sum(p.numel() for p in model.parameters())
