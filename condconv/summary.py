"""Per-block model summary: which blocks are CondConv, their experts, params and MADDs."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from condconv.layers import CondConv2d, CondLinear
from condconv.madds import madds_by_module

__all__ = ["BlockSummary", "model_summary", "format_summary"]


@dataclass(frozen=True)
class BlockSummary:
    """One row of a model summary."""

    name: str
    kind: str
    condconv: bool
    num_experts: int
    params: int
    madds: int


def _rows(model: nn.Module) -> list[tuple[str, nn.Module]]:
    rows: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and name == "blocks":
            rows.extend((f"blocks.{i}", block) for i, block in enumerate(child))
        elif not isinstance(child, nn.Identity):
            rows.append((name, child))
    return rows


def model_summary(model: nn.Module, resolution: int = 224) -> list[BlockSummary]:
    """One row per top-level part (stem, each body block, head, classifier)."""
    per_module = madds_by_module(model, resolution)
    summary = []
    for name, module in _rows(model):
        cond = [m for m in module.modules() if isinstance(m, (CondConv2d, CondLinear))]
        madds = sum(v for k, v in per_module.items() if k == name or k.startswith(name + "."))
        summary.append(
            BlockSummary(
                name=name,
                kind=type(module).__name__,
                condconv=bool(cond),
                num_experts=max((m.num_experts for m in cond), default=0),
                params=sum(p.numel() for p in module.parameters()),
                madds=madds,
            )
        )
    return summary


def format_summary(rows: list[BlockSummary]) -> str:
    """A markdown table of a model summary, with a total row."""
    lines = [
        "| part | block | CondConv | experts | params | MADDs |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.kind} | {'yes' if r.condconv else 'no'} | {r.num_experts or '-'} | "
            f"{r.params:,} | {r.madds:,} |"
        )
    lines.append(
        f"| total | | {sum(r.condconv for r in rows)} CondConv | | {sum(r.params for r in rows):,} | "
        f"{sum(r.madds for r in rows):,} |"
    )
    return "\n".join(lines)
