"""`condconv mlflow replay SPOOL...`: send MLflow writes kept while the tracker was down, and `check`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]


def _spool_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.glob("*.jsonl")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"spool {str(p)!r} does not exist (expected a .jsonl file or a folder of them)")
    return files


def _replay(args: argparse.Namespace) -> int:
    from pipeline.mlflow_spool import replay_spool, set_fast_failing_http_defaults
    from pipeline.tracking import check_tracker

    set_fast_failing_http_defaults()
    if args.tracking_uri:
        check_tracker(args.tracking_uri)
    failed = 0
    for path in _spool_files(args.spool):
        result = replay_spool(path, args.tracking_uri)
        line = f"{path}: sent {result.sent}, dropped {result.dropped}, still spooled {result.remaining}"
        print(line + (f" ({result.error})" if result.error else ""))
        failed += bool(result.remaining)
    if failed:
        print(f"condconv mlflow replay: {failed} spool(s) not fully sent; run the command again when the tracker "
              "is up", file=sys.stderr)
    return 1 if failed else 0


def _check(args: argparse.Namespace) -> int:
    from pipeline.tracking import check_tracker, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracker(uri)
    print(f"MLflow tracker {uri}: reachable" if uri.startswith(("http://", "https://"))
          else f"MLflow tracker {uri}: a local store (nothing to probe)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `condconv mlflow replay` and `condconv mlflow check`."""
    p = subparsers.add_parser("mlflow", help="MLflow tracker tools: replay spooled writes, check a tracker")
    sub = p.add_subparsers(dest="mlflow_command", metavar="ACTION", required=True)
    replay = sub.add_parser(
        "replay",
        help="send the writes a run kept in its spool while the tracker was down",
        description="Send spooled MLflow writes (outputs/mlflow-spool/<run_id>.jsonl, written when the tracker "
        "was unreachable during a fit) in order; sent writes leave the spool. Safe to repeat.",
    )
    replay.add_argument("spool", nargs="+", help="spool file(s) <run_id>.jsonl, or folder(s) holding them")
    replay.add_argument("--tracking-uri", help="send to this tracker (default: the one recorded in the spool)")
    replay.set_defaults(func=_replay)
    check = sub.add_parser("check", help="check that the tracking server answers (GET /health)")
    check.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    check.set_defaults(func=_check)
