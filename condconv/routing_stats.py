"""Per-class routing statistics: how class-specific and how bimodal each layer's routing is.

The paper (Yang et al. 2019, sec. 5) finds that routing becomes class-specific in deeper layers
and that routing weights are bimodal there. These functions measure both, per routing function:

- `collect_routing`: forward hooks on every `RoutingFn` record its output ``[N, experts]`` over a
  dataset (eval mode, no grad); layers are named by module path (``blocks.12.routing``; with
  per-layer routing ``blocks.12.conv_pw.conv.routing``), in depth order.
- Class specificity (`class_specificity`): for each expert, the between-class variance of its
  routing weight over its total variance (the correlation ratio eta^2), averaged over the experts
  whose weight varies at all. 1: the weight is a function of the class; 0: the class means are
  all equal. With routing that ignores the class, eta^2 is ~(classes - 1) / (examples - 1) by
  chance (0.01 for 10 classes and 1000 examples), not exactly 0.
- Bimodality (`bimodality_coefficient`): Sarle's bimodality coefficient of the layer's routing
  weights, ``BC = (skew^2 + 1) / (excess_kurtosis + 3 (n-1)^2 / ((n-2)(n-3)))`` (the sample-size
  corrected form). A uniform distribution has BC = 5/9 ~ 0.556, a normal one 1/3, and two
  well-separated peaks (weights near 0 or 1) approach 1; BC > 5/9 suggests bimodality. Also
  reported, as a plainer measure: `extreme_fraction`, the share of weights within 0.1 of 0 or 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from condconv.routing import routing_modules

__all__ = [
    "RoutingRecord",
    "LayerRoutingStats",
    "collect_routing",
    "class_means",
    "class_specificity",
    "expert_specificity",
    "bimodality_coefficient",
    "extreme_fraction",
    "layer_stats",
    "routing_statistics",
    "analyze_routing",
]

UNIFORM_BIMODALITY = 5.0 / 9.0  # Sarle's coefficient of a uniform distribution: the usual threshold


@dataclass
class RoutingRecord:
    """Routing weights of every routing function over a dataset: ``weights[name]`` is ``[N, experts]``."""

    weights: dict[str, torch.Tensor]
    labels: torch.Tensor  # [N] int64

    @property
    def num_examples(self) -> int:
        """Examples recorded."""
        return int(self.labels.numel())


@dataclass
class LayerRoutingStats:
    """Routing statistics of one routing function (one block, or one layer with per-layer routing)."""

    name: str
    depth: int  # position among the model's routing functions (0 = earliest)
    num_experts: int
    num_examples: int
    class_means: torch.Tensor  # [num_classes, experts]; NaN rows for classes with no example
    specificity: float  # mean over varying experts of between-class / total variance, in [0, 1]
    expert_specificity: torch.Tensor  # [experts]; NaN for an expert whose weight never varies
    bimodality: float  # Sarle's bimodality coefficient of all the layer's weights
    extreme_fraction: float  # share of weights within 0.1 of 0 or 1
    mean: float
    std: float
    histogram: torch.Tensor  # [bins] counts of all the layer's weights over [0, 1]
    bin_edges: torch.Tensor  # [bins + 1]


@torch.no_grad()
def collect_routing(
    model: nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    max_batches: Optional[int] = None,
    device: Optional[torch.device | str] = None,
) -> RoutingRecord:
    """Run ``model`` (eval mode, no grad) over ``(images, labels)`` batches and record every `RoutingFn` output.

    The model's train/eval mode is restored afterwards. ``max_batches`` stops early (None: all).
    """
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r}; expected an int >= 1 or None for all")
    fns = routing_modules(model)
    if not fns:
        raise ValueError("the model has no RoutingFn (a static model, num_experts=0): nothing to analyze")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in fns}
    labels: list[torch.Tensor] = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            chunks[name].append(output.detach().float().cpu())
        return hook

    handles = [fn.register_forward_hook(make_hook(name)) for name, fn in fns.items()]
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            images, targets = batch[0], batch[1]
            model(images.to(device))
            labels.append(torch.as_tensor(targets).detach().reshape(-1).long().cpu())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not labels:
        raise ValueError("no batches to analyze: the data is empty")
    weights = {name: torch.cat(parts) for name, parts in chunks.items()}
    all_labels = torch.cat(labels)
    for name, w in weights.items():
        # A routing fn not run once per batch (e.g. behind a branch) cannot be paired with labels.
        if w.shape[0] != all_labels.numel():
            raise ValueError(f"{name} produced {w.shape[0]} routing vectors for {all_labels.numel()} examples")
    return RoutingRecord(weights=weights, labels=all_labels)


def _check_pair(weights: torch.Tensor, labels: torch.Tensor) -> None:
    if weights.dim() != 2 or labels.dim() != 1 or weights.shape[0] != labels.shape[0]:
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} and labels of shape {tuple(labels.shape)}; "
            f"expected [N, experts] and [N]"
        )
    if labels.numel() == 0:
        raise ValueError("no examples: weights and labels are empty")


def class_means(weights: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """Mean routing vector of each class, ``[num_classes, experts]`` (NaN for a class with no example)."""
    _check_pair(weights, labels)
    n = int(num_classes if num_classes is not None else labels.max().item() + 1)
    if labels.min().item() < 0 or labels.max().item() >= n:
        raise ValueError(f"labels span [{labels.min().item()}, {labels.max().item()}]; expected [0, {n})")
    w = weights.double()
    sums = torch.zeros(n, w.shape[1], dtype=torch.double).index_add_(0, labels, w)
    counts = torch.bincount(labels, minlength=n).double()[:, None]
    return (sums / counts).float()  # 0/0 -> NaN for empty classes


def expert_specificity(weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per expert, between-class variance / total variance (eta^2, in [0, 1]); NaN where the weight is constant."""
    _check_pair(weights, labels)
    w = weights.double()
    n = int(labels.max().item()) + 1
    counts = torch.bincount(labels, minlength=n).double()
    sums = torch.zeros(n, w.shape[1], dtype=torch.double).index_add_(0, labels, w)
    present = counts > 0
    means = sums[present] / counts[present, None]
    grand = w.mean(0)
    total = ((w - grand) ** 2).sum(0)
    between = (counts[present, None] * (means - grand) ** 2).sum(0)
    # Relative threshold: float round-off makes a constant weight's variance tiny but not 0.
    constant = total <= 1e-12 * w.shape[0] * (1.0 + grand.abs()) ** 2
    ratio = (between / total.clamp_min(1e-300)).clamp(0.0, 1.0)
    return torch.where(constant, torch.full_like(ratio, math.nan), ratio).float()


def class_specificity(weights: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class over total variance of the routing weights, averaged over experts that vary (0 if none)."""
    eta = expert_specificity(weights, labels)
    varying = eta[~torch.isnan(eta)]
    return float(varying.mean()) if varying.numel() else 0.0


def bimodality_coefficient(values: torch.Tensor) -> float:
    """Sarle's bimodality coefficient (sample-corrected); 5/9 for uniform, -> 1 for two separated peaks.

    Needs at least 4 values; a constant sample (no spread) gives 0.
    """
    x = values.detach().reshape(-1).double()
    n = x.numel()
    if n < 4:
        raise ValueError(f"bimodality_coefficient needs at least 4 values, got {n}")
    d = x - x.mean()
    m2 = (d**2).mean()
    if m2 <= 1e-24 * (1.0 + x.mean().abs() ** 2):
        return 0.0
    g1 = (d**3).mean() / m2**1.5  # population skewness and excess kurtosis, then the usual
    g2 = (d**4).mean() / m2**2 - 3.0  # small-sample corrections (as SAS/scipy bias=False)
    skew = g1 * math.sqrt(n * (n - 1)) / (n - 2)
    kurt = ((n + 1) * g2 + 6) * (n - 1) / ((n - 2) * (n - 3))
    return float((skew**2 + 1) / (kurt + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3))))


def extreme_fraction(values: torch.Tensor, margin: float = 0.1) -> float:
    """Share of values within ``margin`` of 0 or of 1 (routing weights in [0, 1])."""
    if not 0.0 < margin < 0.5:
        raise ValueError(f"margin={margin!r}; expected a number in (0, 0.5)")
    x = values.detach().reshape(-1)
    if x.numel() == 0:
        raise ValueError("extreme_fraction of no values")
    return float(((x <= margin) | (x >= 1.0 - margin)).double().mean())


def layer_stats(
    name: str, weights: torch.Tensor, labels: torch.Tensor, num_classes: Optional[int] = None,
    depth: int = 0, bins: int = 20,
) -> LayerRoutingStats:
    """All statistics of one layer's routing weights ``[N, experts]`` with class ``labels`` ``[N]``."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins={bins!r}; expected an int >= 1")
    _check_pair(weights, labels)
    flat = weights.reshape(-1).float()
    # Routing weights lie in [0, 1] (sigmoid and softmax alike): a fixed range keeps layers comparable.
    hist = torch.histc(flat.clamp(0.0, 1.0), bins=bins, min=0.0, max=1.0)
    eta = expert_specificity(weights, labels)
    varying = eta[~torch.isnan(eta)]
    return LayerRoutingStats(
        name=name,
        depth=depth,
        num_experts=int(weights.shape[1]),
        num_examples=int(weights.shape[0]),
        class_means=class_means(weights, labels, num_classes),
        specificity=float(varying.mean()) if varying.numel() else 0.0,
        expert_specificity=eta,
        bimodality=bimodality_coefficient(flat) if flat.numel() >= 4 else 0.0,
        extreme_fraction=extreme_fraction(flat),
        mean=float(flat.mean()),
        std=float(flat.std()) if flat.numel() > 1 else 0.0,
        histogram=hist,
        bin_edges=torch.linspace(0.0, 1.0, bins + 1),
    )


def routing_statistics(record: RoutingRecord, num_classes: Optional[int] = None, bins: int = 20) -> list[LayerRoutingStats]:
    """`layer_stats` of every recorded routing function, in depth order."""
    n = num_classes if num_classes is not None else int(record.labels.max().item()) + 1
    return [
        layer_stats(name, w, record.labels, n, depth, bins)
        for depth, (name, w) in enumerate(record.weights.items())
    ]


def analyze_routing(
    model: nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    num_classes: Optional[int] = None,
    max_batches: Optional[int] = None,
    bins: int = 20,
) -> list[LayerRoutingStats]:
    """`collect_routing` then `routing_statistics`: per-layer routing statistics of ``model`` on a dataset."""
    return routing_statistics(collect_routing(model, batches, max_batches), num_classes, bins)
