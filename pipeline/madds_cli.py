"""`condconv madds`: MADD/parameter tables for any archs, widths, experts and placements.

With no arguments it prints the paper's table 1 next to our counts.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
from typing import Sequence

__all__ = ["register", "madds_table", "paper_table", "format_rows"]


def _placement_arg(text: str) -> str | list[int | str]:
    """'paper' / 'all' / 'none' / 'last:K' as is; '3,4,fc' as a list of block indices."""
    if "," in text or text.lstrip("-").isdigit():
        return [int(p) if p.lstrip("-").isdigit() else p for p in text.split(",") if p]
    return text


def madds_table(
    archs: Sequence[str],
    widths: Sequence[float],
    experts: Sequence[int],
    placements: Sequence[str | list],
    resolution: int = 224,
    summary: bool = False,
) -> list[dict]:
    """One row per (arch, width, experts, placement); static models (experts 0) once per arch/width."""
    import condconv

    specs, seen = [], set()
    # Validate every spec before building any model.
    for arch, width, n, placement in itertools.product(archs, widths, experts, placements):
        spec = condconv.ModelSpec(arch=arch, width_mult=width, num_experts=n, placement=placement, resolution=resolution)
        if spec.name not in seen:
            seen.add(spec.name)
            specs.append(spec)
    rows = []
    for spec in specs:
        model = condconv.create_model(spec)
        row = {
            "model": spec.name,
            "arch": spec.arch,
            "width_mult": spec.width_mult,
            "num_experts": spec.num_experts,
            "placement": spec.placement if spec.num_experts else "-",
            "resolution": resolution,
            "madds_m": round(condconv.count_madds(model, resolution) / 1e6, 1),
            "params_m": round(condconv.count_params(model) / 1e6, 2),
        }
        if summary:
            row["summary"] = condconv.format_summary(condconv.model_summary(model, resolution))
        rows.append(row)
    return rows


def paper_table() -> list[dict]:
    """The paper's table 1 side by side with our counts (8 experts, paper placement)."""
    import condconv
    from condconv.paper import PAPER_TABLE

    rows = []
    for ref in PAPER_TABLE:
        static = condconv.create_model(ref.arch)
        cond = condconv.create_model(ref.arch, num_experts=8)
        s_madds, c_madds = condconv.count_madds(static) / 1e6, condconv.count_madds(cond) / 1e6
        rows.append(
            {
                "arch": ref.arch,
                "static_madds_m": round(s_madds, 1),
                "paper_static_madds_m": ref.static_madds,
                "condconv_madds_m": round(c_madds, 1),
                "paper_condconv_madds_m": ref.condconv_madds,
                "static_params_m": round(condconv.count_params(static) / 1e6, 2),
                "condconv_params_m": round(condconv.count_params(cond) / 1e6, 2),
                "paper_static_top1": ref.static_top1,
                "paper_condconv_top1": ref.condconv_top1,
            }
        )
    return rows


def format_rows(rows: list[dict], as_csv: bool = False) -> str:
    """Rows as a markdown table (default) or CSV."""
    if not rows:
        return ""
    keys = [k for k in rows[0] if k != "summary"]
    if as_csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    custom = any(v is not None for v in (args.arch, args.width, args.experts, args.placement))
    if not custom:
        print(format_rows(paper_table(), args.csv))
        return 0
    import condconv

    rows = madds_table(
        args.arch or condconv.list_models(),
        args.width or [1.0],
        args.experts if args.experts is not None else [0, 8],
        args.placement or ["paper"],
        args.resolution,
        summary=args.summary,
    )
    print(format_rows(rows, args.csv))
    if args.summary:
        for row in rows:
            print(f"\n### {row['model']}\n\n{row['summary']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `condconv madds`."""
    p = subparsers.add_parser(
        "madds",
        help="MADD and parameter table (no arguments: the paper's table 1 side by side)",
        description="Count multiply-adds and parameters. With no arguments, prints the paper's table 1 "
        "next to this library's counts.",
    )
    p.add_argument("--arch", nargs="+", help="architectures (default: all)")
    p.add_argument("--width", nargs="+", type=float, help="width multipliers (default: 1.0)")
    p.add_argument("--experts", nargs="+", type=int, help="expert counts, 0 = static (default: 0 8)")
    p.add_argument(
        "--placement", nargs="+", type=_placement_arg,
        help="paper | all | none | last:K | comma-separated block indices (and head/fc) (default: paper)",
    )
    p.add_argument("--resolution", type=int, default=224, help="input size (default: 224)")
    p.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    p.add_argument("--summary", action="store_true", help="also print a per-block summary of each model")
    p.set_defaults(func=_run)
