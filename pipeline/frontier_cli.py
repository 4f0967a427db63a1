"""`condconv frontier`: the accuracy-vs-MADD Pareto frontier of a sweep's MLflow runs.

Reads the finished trial runs, writes ``frontier.png``/``.html``/``.csv``, logs them onto the
sweep's parent run (under ``frontier/``) and prints each family's front as a table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import frontier as fr

# Metrics whose EMA twin the trainer logs with this suffix (`val_top1` -> `val_top1_ema`).
EMA_SUFFIX = "_ema"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``frontier`` subcommand to the ``condconv`` parser."""
    p = subparsers.add_parser(
        "frontier",
        help="Pareto frontier (accuracy vs MADDs) of a sweep's MLflow runs",
        description=(
            "Read the finished runs of an MLflow experiment, compute the accuracy-vs-MADD Pareto "
            "front of the static and the CondConv models separately, write frontier.png/.html/.csv "
            "and log them onto the sweep's parent run."
        ),
    )
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--parent-run", default=None, metavar="RUN_ID",
                   help="sweep parent run: read only its children and log the files onto it "
                        "(default: the experiment's latest run tagged condconv.role=sweep)")
    p.add_argument("--all-runs", action="store_true",
                   help="read every finished run of the experiment, not only one sweep's children")
    p.add_argument("--metric", default="val_top1",
                   help="run metric to plot, last logged value (default: val_top1; e.g. map for detection)")
    p.add_argument("--ema", action="store_true",
                   help=f"use the EMA weights' metric (METRIC{EMA_SUFFIX})")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: {fr.DEFAULT_OUT_ROOT}/<experiment>)")
    p.add_argument("--no-log", action="store_true", help="do not log the files onto the parent run")
    p.set_defaults(func=run_frontier)


def run_frontier(args: argparse.Namespace) -> int:
    """Handler of ``condconv frontier``; returns the exit code (ValueError for bad input)."""
    metric = args.metric + EMA_SUFFIX if args.ema else args.metric
    client = fr.mlflow_client(args.tracking_uri)
    experiment_id = fr.get_experiment_id(client, args.experiment)

    parent = args.parent_run
    if parent is not None:
        try:
            parent_run = client.get_run(parent)
        except Exception as err:  # MlflowException: the id does not exist in this store
            raise ValueError(f"--parent-run {parent!r}: no such run at {client.tracking_uri}") from err
        if parent_run.info.experiment_id != experiment_id:
            raise ValueError(f"--parent-run {parent!r} belongs to another experiment, not {args.experiment!r}")
    else:
        parent = fr.latest_sweep_run_id(client, experiment_id)

    read = fr.read_mlflow_runs(
        args.experiment, args.tracking_uri,
        parent_run_id=None if args.all_runs else parent, metric=metric,
    )
    scope = "all runs" if args.all_runs or parent is None else f"children of run {parent}"
    if read.skipped:
        print(f"{read.skip_summary()} ({scope})")
    if not read.points:
        raise ValueError(
            f"no finished runs with metric {metric!r} and a 'madds' param in experiment "
            f"{args.experiment!r} ({scope})"
        )

    label = fr.metric_label(metric)
    out_dir = args.out or fr.DEFAULT_OUT_ROOT / fr.safe_dirname(args.experiment)
    paths = fr.write_frontier(read.points, out_dir, metric_name=label)
    print(f"{len(read.points)} runs ({scope}), metric {metric!r}")
    print(fr.format_table(read.points, metric_name=label))
    for path in paths.values():
        print(f"wrote {path}")
    if args.no_log:
        return 0
    if parent is None:
        print("no sweep parent run (tag condconv.role=sweep) in this experiment: files not logged to MLflow")
        return 0
    for artifact in fr.log_frontier_to_mlflow(paths, parent, args.tracking_uri):
        print(f"logged {artifact} to run {parent}")
    return 0
