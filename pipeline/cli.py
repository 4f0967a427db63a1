"""The `condconv` command line: one entry point, one subcommand per job.

Subcommand modules are imported lazily so that `condconv madds` does not pay for importing
Ray, MLflow or Lightning.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# `fit`, `validate` and `test` are LightningCLI subcommands; everything after them goes to it.
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")

# subcommand -> module with `register(subparsers)`; each module adds its own parser(s).
SUBCOMMAND_MODULES = {
    "madds": "pipeline.madds_cli",
    "data": "pipeline.data.cli",
    "frontier": "pipeline.frontier_cli",
    "sweep": "pipeline.sweep_cli",
    "routing": "pipeline.routing_cli",
    "demo": "pipeline.demo",
    "mlflow": "pipeline.mlflow_cli",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the argparse parser of every non-Lightning subcommand."""
    parser = argparse.ArgumentParser(
        prog="condconv",
        description="CondConv models: MADD tables, data conversion, training, sweeps, frontier plots.",
        epilog="Training: condconv fit|validate|test --config FILE (LightningCLI; --help for its options).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMAND_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # subcommand not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `condconv` command line; returns the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in LIGHTNING_SUBCOMMANDS:
        from pipeline.lightning_cli import run_lightning_cli

        return run_lightning_cli(args_list)
    parser = build_parser()
    args = parser.parse_args(args_list)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Bad input: one clear line, no stack trace.
        print(f"condconv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
