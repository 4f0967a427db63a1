"""`condconv demo`: the README's demo (prints the paper's MADD table until the sweep demo lands)."""
from __future__ import annotations

import argparse

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from pipeline.madds_cli import format_rows, paper_table

    print("Paper table 1: our MADD/param counts next to the paper's (224x224, 8 experts, paper placement)\n")
    print(format_rows(paper_table()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `condconv demo`."""
    p = subparsers.add_parser("demo", help="run the demo")
    p.set_defaults(func=_run)
