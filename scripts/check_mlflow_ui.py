"""Check that a sweep's frontier shows in the MLflow UI: start `mlflow server` on loopback, load the
parent run's artifact page in headless Chromium, and confirm the frontier artifacts are listed.

    python scripts/check_mlflow_ui.py --tracking-uri sqlite:///$PWD/mlflow.db --experiment condconv-demo-sweep \
        --screenshot outputs/mlflow-ui.png

Needs Debian's `chromium` (`apt-get install chromium`). The server binds to 127.0.0.1 only and is
stopped at the end. Exit code 0 when the page lists frontier.png, frontier.html and frontier.csv.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=15000", "--window-size=1400,900",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout:.0f} s")


def main() -> int:
    """Run the check; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--screenshot", help="also save a PNG of the artifact page here")
    args = parser.parse_args()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("check_mlflow_ui: chromium not found; install it with `apt-get install chromium`", file=sys.stderr)
        return 2
    from mlflow.tracking import MlflowClient

    from pipeline.frontier import get_experiment_id, latest_sweep_run_id

    client = MlflowClient(args.tracking_uri)
    experiment_id = get_experiment_id(client, args.experiment)
    run_id = latest_sweep_run_id(client, experiment_id)
    if run_id is None:
        print(f"check_mlflow_ui: experiment {args.experiment!r} has no sweep parent run", file=sys.stderr)
        return 2

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", args.tracking_uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_healthy(url)
        # Open the frontier plot itself in the artifact viewer.
        page = f"{url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/frontier/frontier.png"
        with tempfile.TemporaryDirectory() as profile:
            flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
            dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
            if args.screenshot:
                Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
                subprocess.run([chromium, *flags, f"--screenshot={Path(args.screenshot).resolve()}", page],
                               capture_output=True, timeout=120)
    finally:
        # The server forks workers: stop its whole process group.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    missing = [name for name in ("frontier.png", "frontier.html", "frontier.csv") if name not in dom]
    print(f"MLflow UI page {page}: {'OK' if not missing else 'missing ' + ', '.join(missing)}")
    if args.screenshot:
        print(f"screenshot: {args.screenshot}")
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
