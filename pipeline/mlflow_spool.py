"""MLflow writes that survive a tracker outage: spooled to a local JSONL file, sent when it is back.

`SpoolingMlflowClient` wraps an ``MlflowClient``. Its writes (metrics, params, tags, run status,
artifacts) go to the tracker; when one fails for a transient reason (connection refused, timeout,
HTTP 5xx) it is appended to ``<spool_dir>/<run_id>.jsonl`` instead (artifact files are copied
next to it), and training goes on. Until the tracker answers again, later writes are spooled
without contacting it (one attempt per ``retry_interval_s``), so an outage does not slow
training down. The first write that gets through first sends the spool, in order, and deletes it.
What is still spooled at the end of a fit stays on disk; ``condconv mlflow replay SPOOL`` sends it.

Replaying is idempotent: metrics keep their original step and timestamp (MLflow drops exact
duplicates), params and tags are set to the same values, the run's end status is set again.
A write the tracker refuses for good (HTTP 4xx, e.g. a param logged twice with different
values) is dropped with a warning rather than blocking the rest of the spool.

`SpoolingMLFlowLogger` is Lightning's ``MLFlowLogger`` with this client. MLflow's own HTTP
retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with exponential backoff, and a 120 s
timeout) would block a training step for minutes per write when the tracker is down; the logger
sets lower defaults (`set_fast_failing_http_defaults`) unless those variables are already set.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

__all__ = [
    "DEFAULT_SPOOL_DIR",
    "SpoolingMlflowClient",
    "SpoolingMLFlowLogger",
    "ReplayResult",
    "replay_spool",
    "is_transient",
    "set_fast_failing_http_defaults",
]

log = logging.getLogger(__name__)

DEFAULT_SPOOL_DIR = "outputs/mlflow-spool"
# Per write while the tracker is down: 1 retry, no backoff; a hung server times out after 10 s.
FAST_FAILING_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def set_fast_failing_http_defaults() -> None:
    """Make MLflow HTTP calls fail within seconds, not minutes, unless the user set these variables."""
    for name, value in FAST_FAILING_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def is_transient(err: BaseException) -> bool:
    """True for errors that may go away (tracker down, timeout, HTTP 5xx); False for refusals (HTTP 4xx)."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    return isinstance(err, (OSError, ConnectionError, TimeoutError)) or type(err).__module__.startswith(
        ("requests", "urllib3"))


# ----------------------------------------------------------------------------- spool entries
def _metric(m: Any) -> dict[str, Any]:
    return {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}


def _key_value(p: Any) -> dict[str, Any]:
    return {"key": p.key, "value": p.value}


def _send(client: Any, entry: dict[str, Any]) -> None:
    """Perform one spooled write with ``client``."""
    from mlflow.entities import Metric, Param, RunTag

    op, run_id = entry["op"], entry["run_id"]
    if op == "log_batch":
        client.log_batch(
            run_id,
            metrics=[Metric(**m) for m in entry.get("metrics", [])],
            params=[Param(**p) for p in entry.get("params", [])],
            tags=[RunTag(**t) for t in entry.get("tags", [])],
        )
    elif op == "set_terminated":
        client.set_terminated(run_id, status=entry.get("status"), end_time=entry.get("end_time"))
    elif op == "log_artifact":
        client.log_artifact(run_id, entry["local_path"], artifact_path=entry.get("artifact_path"))
    elif op == "log_artifacts":
        client.log_artifacts(run_id, entry["local_dir"], artifact_path=entry.get("artifact_path"))
    else:
        raise ValueError(f"unknown spool entry op={op!r}; expected log_batch, set_terminated, log_artifact(s)")


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rewrite(path: Path, entries: list[dict[str, Any]]) -> None:
    """Replace the spool with ``entries`` atomically (delete it and its files when empty)."""
    if not entries:
        path.unlink(missing_ok=True)
        shutil.rmtree(_files_dir(path), ignore_errors=True)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")
    os.replace(tmp, path)


def _files_dir(path: Path) -> Path:
    return path.with_suffix(".files")


@dataclass
class ReplayResult:
    """What a replay did: writes sent, writes the tracker refused (dropped), writes still spooled."""

    sent: int
    dropped: int
    remaining: int
    error: Optional[str] = None  # why the replay stopped early (tracker still unreachable)


def _replay(path: Path, client: Any) -> ReplayResult:
    entries = _read(path)
    sent = dropped = 0
    for i, entry in enumerate(entries):
        try:
            _send(client, entry)
        except Exception as err:  # noqa: BLE001 - classified just below
            if is_transient(err):
                _rewrite(path, entries[i:])
                return ReplayResult(sent, dropped, len(entries) - i, " ".join(str(err).split())[:300])
            dropped += 1
            log.warning("MLflow refused spooled %s for run %s, dropped: %s", entry["op"], entry["run_id"],
                        " ".join(str(err).split())[:300])
            continue
        sent += 1
    _rewrite(path, [])
    return ReplayResult(sent, dropped, 0)


def replay_spool(path: str | os.PathLike, tracking_uri: Optional[str] = None) -> ReplayResult:
    """Send a spool file's writes to ``tracking_uri`` (default: the URI recorded in the spool), in order.

    Sent writes leave the file; when all are sent, the file and its copied artifacts are deleted.
    """
    from mlflow.tracking import MlflowClient

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spool file {str(path)!r} does not exist")
    entries = _read(path)
    if not entries:
        _rewrite(path, [])
        return ReplayResult(0, 0, 0)
    uri = tracking_uri or entries[0].get("tracking_uri")
    if not uri:
        raise ValueError(f"{path}: no tracking URI recorded; pass one (--tracking-uri)")
    return _replay(path, MlflowClient(uri))


# ----------------------------------------------------------------------------- the client
class SpoolingMlflowClient:
    """An ``MlflowClient`` whose writes are spooled to disk while the tracker is unreachable.

    Reads (``get_run``, ``search_runs`` ...) pass straight through and raise as usual.

    Args:
        client: the ``MlflowClient`` to wrap.
        spool_dir: where ``<run_id>.jsonl`` spools (and copies of spooled artifacts) go.
        retry_interval_s: after a failed write, spool without contacting the tracker for this long.
        clock: monotonic time source (seconds).
    """

    def __init__(self, client: Any, spool_dir: str | os.PathLike = DEFAULT_SPOOL_DIR,
                 retry_interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if retry_interval_s < 0:
            raise ValueError(f"retry_interval_s={retry_interval_s!r}; expected a number >= 0")
        self._client = client
        self.spool_dir = Path(os.path.abspath(spool_dir))
        self.retry_interval_s = retry_interval_s
        self._clock = clock
        self._offline_until: Optional[float] = None
        self._spooled_runs: set[str] = set()
        self._seen_runs: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    @property
    def tracking_uri(self) -> str:
        """The wrapped client's tracking URI."""
        return self._client.tracking_uri

    def spool_path(self, run_id: str) -> Path:
        """The spool file of ``run_id``."""
        return self.spool_dir / f"{run_id}.jsonl"

    # -- writes
    def log_batch(self, run_id: str, metrics=(), params=(), tags=(), **kwargs: Any) -> None:
        """``MlflowClient.log_batch``, spooled when the tracker is unreachable."""
        metrics, params, tags = list(metrics), list(params), list(tags)
        self._write(run_id, lambda: self._client.log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs),
                    lambda: {"op": "log_batch", "metrics": [_metric(m) for m in metrics],
                             "params": [_key_value(p) for p in params], "tags": [_key_value(t) for t in tags]})

    def log_metric(self, run_id: str, key: str, value: float, timestamp: Optional[int] = None,
                   step: Optional[int] = None, **kwargs: Any) -> None:
        """``MlflowClient.log_metric``, spooled (with the original timestamp) when the tracker is unreachable."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000) if timestamp is None else timestamp
        self.log_batch(run_id, metrics=[Metric(key, value, timestamp, step or 0)])

    def log_param(self, run_id: str, key: str, value: Any, **kwargs: Any) -> Any:
        """``MlflowClient.log_param``, spooled when the tracker is unreachable."""
        from mlflow.entities import Param

        self.log_batch(run_id, params=[Param(key, str(value))])
        return value

    def set_tag(self, run_id: str, key: str, value: Any, **kwargs: Any) -> None:
        """``MlflowClient.set_tag``, spooled when the tracker is unreachable."""
        from mlflow.entities import RunTag

        self.log_batch(run_id, tags=[RunTag(key, str(value))])

    def set_terminated(self, run_id: str, status: Optional[str] = None, end_time: Optional[int] = None) -> None:
        """``MlflowClient.set_terminated`` (end time fixed now, not at replay), spooled when unreachable."""
        end_time = int(time.time() * 1000) if end_time is None else end_time
        self._write(run_id, lambda: self._client.set_terminated(run_id, status=status, end_time=end_time),
                    lambda: {"op": "set_terminated", "status": status, "end_time": end_time})

    def log_artifact(self, run_id: str, local_path: str, artifact_path: Optional[str] = None) -> None:
        """``MlflowClient.log_artifact``; when unreachable the file is copied into the spool."""
        self._write(run_id, lambda: self._client.log_artifact(run_id, local_path, artifact_path=artifact_path),
                    lambda: {"op": "log_artifact", "artifact_path": artifact_path,
                             "local_path": str(self._keep(run_id, local_path))})

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: Optional[str] = None) -> None:
        """``MlflowClient.log_artifacts``; when unreachable the folder is copied into the spool."""
        self._write(run_id, lambda: self._client.log_artifacts(run_id, local_dir, artifact_path=artifact_path),
                    lambda: {"op": "log_artifacts", "artifact_path": artifact_path,
                             "local_dir": str(self._keep(run_id, local_dir))})

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """``MlflowClient.log_text`` as a file artifact (so that it can be spooled)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, Path(artifact_file).name)
            path.write_text(text)
            self.log_artifact(run_id, str(path), artifact_path=str(Path(artifact_file).parent) or None)

    # -- the spool
    def flush(self, force: bool = False) -> int:
        """Send every spooled write now (``force``: even within the retry interval); returns how many remain."""
        if not force and self._offline():
            return self.pending()
        remaining = 0
        for run_id in sorted(self._spooled_runs):
            path = self.spool_path(run_id)
            result = _replay(path, self._client)
            if result.remaining:
                self._go_offline(result.error or "unreachable", path)
                remaining += result.remaining
            else:
                self._spooled_runs.discard(run_id)
                if result.sent:
                    log.warning("MLflow tracker %s is back: sent %d spooled writes of run %s",
                                self.tracking_uri, result.sent, run_id)
        if not remaining:
            self._offline_until = None  # a later outage is announced again
        return remaining

    def pending(self) -> int:
        """Writes spooled and not sent yet."""
        return sum(len(_read(self.spool_path(r))) for r in self._spooled_runs)

    def _offline(self) -> bool:
        return self._offline_until is not None and self._clock() < self._offline_until

    def _go_offline(self, reason: str, path: Path) -> None:
        if self._offline_until is None:
            log.warning("MLflow tracker %s unreachable (%s); training goes on, writes are kept in %s and sent "
                        "when it is back (retry every %gs)", self.tracking_uri, reason[:200], path,
                        self.retry_interval_s)
        self._offline_until = self._clock() + self.retry_interval_s

    def _append(self, run_id: str, entry: dict[str, Any]) -> None:
        path = self.spool_path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({**entry, "run_id": run_id, "tracking_uri": self.tracking_uri}) + "\n")
        self._spooled_runs.add(run_id)

    def _keep(self, run_id: str, local: str) -> Path:
        """Copy a file or folder into the spool (the caller's copy may be temporary)."""
        dest = _files_dir(self.spool_path(run_id)) / uuid.uuid4().hex / Path(local).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(local).is_dir():
            shutil.copytree(local, dest)
        else:
            shutil.copy2(local, dest)
        return dest

    def _write(self, run_id: str, call: Callable[[], Any], entry: Callable[[], dict[str, Any]]) -> None:
        if run_id not in self._seen_runs:
            # A spool left by an earlier process of this run (a restarted worker) goes first.
            self._seen_runs.add(run_id)
            if self.spool_path(run_id).is_file():
                self._spooled_runs.add(run_id)
        if self._spooled_runs:
            # Keep the order: earlier writes are still waiting, this one goes behind them.
            self._append(run_id, entry())
            self.flush()
            return
        if self._offline():
            self._append(run_id, entry())
            return
        try:
            call()
        except Exception as err:  # noqa: BLE001 - classified just below
            if not is_transient(err):
                raise
            self._append(run_id, entry())
            self._go_offline(" ".join(str(err).split()), self.spool_path(run_id))
            return
        self._offline_until = None


class SpoolingMLFlowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` whose writes survive a tracker outage (`SpoolingMlflowClient`).

    Args:
        spool_dir: where writes wait while the tracker is down (``<run_id>.jsonl``).
        retry_interval_s: how often to try the tracker again while it is down.
        **kwargs: ``MLFlowLogger``'s arguments.
    """

    def __init__(self, *args: Any, spool_dir: str | os.PathLike = DEFAULT_SPOOL_DIR,
                 retry_interval_s: float = 30.0, **kwargs: Any) -> None:
        set_fast_failing_http_defaults()
        super().__init__(*args, **kwargs)
        self._mlflow_client = SpoolingMlflowClient(self._mlflow_client, spool_dir, retry_interval_s)

    @property
    def spool(self) -> SpoolingMlflowClient:
        """The spooling client (also what ``experiment`` returns)."""
        return self._mlflow_client

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Set the run's end status (spooled if need be), then try once more to send the spool."""
        if not self._initialized:
            return
        status = {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}.get(status, status)
        if self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)
        # Lightning's finalize first reads the run back (get_run), which fails while the tracker is down.
        self.experiment.set_terminated(self.run_id, status)
        if self.spool.flush(force=True):
            path = self.spool.spool_path(self.run_id)
            log.warning("MLflow tracker %s still unreachable at the end of the fit: %d writes are kept in %s; "
                        "send them with `condconv mlflow replay %s`", self.spool.tracking_uri,
                        self.spool.pending(), path, path)
