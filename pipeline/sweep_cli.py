"""`condconv sweep FILE`: run (or resume) a sweep on a local or existing Ray cluster."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

__all__ = ["register", "mlflow_ui_command"]


def mlflow_ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on a tracking store (loopback only)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    # The interpreter running condconv has mlflow installed, whether or not a venv is activated.
    return f"{sys.executable} -m mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def main_sweep(
    file: str, name: Optional[str] = None, storage_path: Optional[str] = None, address: Optional[str] = None,
    verbose: int = 1, dry_run: bool = False,
) -> int:
    """Run (or resume, or with ``dry_run`` only validate) a sweep file and print its results."""
    from pipeline.sweep import format_outcomes, prepare_trials, run_sweep
    from pipeline.sweep_config import load_sweep

    sweep = load_sweep(file, name=name)
    if storage_path:
        sweep.storage_path = storage_path
    if dry_run:
        trials = prepare_trials(sweep)
        print(f"sweep {sweep.name}: {len(trials)} valid trials")
        for t in trials:
            print(f"  {t.key}: {t.overrides}")
        return 0

    result = run_sweep(sweep, address=address, verbose=verbose)
    print(f"\nTrials of sweep {result.name} (MLflow parent run {result.parent_run_id}):\n")
    print(format_outcomes(result))
    if result.frontier_table:
        print(f"\nAccuracy-vs-MADD frontier ({result.metric}; static = width scaling, condconv = experts):\n")
        print(result.frontier_table + "\n")
        for kind, path in result.frontier_paths.items():
            print(f"frontier {kind}: {path}")
    print(f"\nMLflow UI: {mlflow_ui_command(result.tracking_uri)}")
    print(f"  then open experiment {result.experiment_name!r}, run {result.name!r}, Artifacts > frontier/")
    failed = [t for t in result.trials if t.status != "DONE"]
    for t in failed:
        print(f"trial {t.key} failed: {t.error}")
    return 1 if failed else 0


def _run(args: argparse.Namespace) -> int:
    return main_sweep(args.file, args.name, args.storage_path, args.address, args.verbose, args.dry_run)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `condconv sweep`."""
    p = subparsers.add_parser(
        "sweep",
        help="run a sweep (Ray Tune grid, one Ray Train DDP job per trial); rerun to resume",
        description="Run or resume a sweep. Starts a local Ray cluster unless RAY_ADDRESS/--address names "
        "one (or the command runs on a cluster via `ray submit` / `ray job submit`).",
    )
    p.add_argument("file", help="sweep YAML (see tasks/sweeps/)")
    p.add_argument("--name", help="override the sweep's name (a new name starts a new sweep)")
    p.add_argument(
        "--storage-path", help="override the sweep's storage_path (Ray results/checkpoints: a path, s3://, gs://)"
    )
    p.add_argument("--address", help="Ray cluster address; 'auto' joins the cluster running on this machine "
        "(default: $RAY_ADDRESS, else a new local cluster)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the trials, run nothing")
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2], help="Tune's progress output (default 1)")
    p.set_defaults(func=_run)
