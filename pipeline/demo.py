"""`condconv demo`: the README's demo, the product's main job on its embedded defaults.

Writes scikit-learn's digits as an ImageNet-style folder, converts it to webdataset shards with the
same converter as ImageNet, and runs `tasks/sweeps/demo.yaml`: static MobileNetV1 at three widths
against CondConv MobileNetV1 at three expert counts, each trial a 2-worker DDP job on a local Ray
cluster, logged to the local MLflow store, ending with the accuracy-vs-MADD frontier.
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "prepare_digits"]

DEMO_SWEEP = Path(__file__).resolve().parent.parent / "tasks" / "sweeps" / "demo.yaml"


def prepare_digits(root: Path) -> Path:
    """Make ``root/digits-wds`` (shards + manifest) unless it exists; returns its path."""
    from pipeline.data.digits import write_digits
    from pipeline.data.imagenet_wds import convert_imagenet_to_wds

    raw, shards = root / "digits-raw", root / "digits-wds"
    if (shards / "manifest.json").is_file():
        print(f"demo data: reusing {shards}")
        return shards
    write_digits(raw, overwrite=True)
    convert_imagenet_to_wds(raw, shards, overwrite=True)
    print(f"demo data: wrote {shards}")
    return shards


def _run(args: argparse.Namespace) -> int:
    from pipeline.sweep_cli import main_sweep

    prepare_digits(Path(args.data_root))
    return main_sweep(str(args.sweep), name=None, storage_path=None, address=None, verbose=args.verbose)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `condconv demo`."""
    p = subparsers.add_parser(
        "demo",
        help="make the digits shards and run the demo sweep (local Ray, local MLflow store)",
        description="The demo: digits -> webdataset shards -> a sweep of static vs CondConv MobileNetV1 "
        "(2 DDP workers per trial) -> the accuracy-vs-MADD frontier. Rerun to resume.",
    )
    p.add_argument("--data-root", default="data", help="where the digits folder and shards go (default: data)")
    p.add_argument("--sweep", default=str(DEMO_SWEEP), help="sweep file (default: tasks/sweeps/demo.yaml)")
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2], help="Tune's progress output")
    p.set_defaults(func=_run)
