"""Record a sweep trial's worker failures on its MLflow run (a Ray Train controller callback).

When a worker process of a trial dies (killed, out of memory, a lost node), Ray Train restarts
the trial's worker group from its last reported checkpoint, up to the sweep's ``max_failures``
times (`ray.train.FailureConfig`). The restart happens inside one ``TorchTrainer.fit`` and logs
into the same MLflow run; this callback makes it visible there: the tag
``condconv.worker_failures`` counts the failures, ``condconv.last_worker_failure`` holds the
last one in a line. (The restarted workers add the metric ``resumed_at_epoch``.)
"""
from __future__ import annotations

from typing import Any, Dict

from ray.train import UserCallback

__all__ = ["WorkerFailureRecorder", "WORKER_FAILURES_TAG", "LAST_WORKER_FAILURE_TAG"]

WORKER_FAILURES_TAG = "condconv.worker_failures"
LAST_WORKER_FAILURE_TAG = "condconv.last_worker_failure"


class WorkerFailureRecorder(UserCallback):
    """Count worker-group failures of one trial on its MLflow run (runs in the Ray Train controller)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id

    def after_exception(self, run_context: Any, worker_exceptions: Dict[int, Exception]) -> None:
        """Increment ``condconv.worker_failures`` and describe the failure (never raises)."""
        from mlflow.tracking import MlflowClient

        from pipeline.mlflow_spool import set_fast_failing_http_defaults

        set_fast_failing_http_defaults()
        ranks = sorted(worker_exceptions)
        first = worker_exceptions[ranks[0]]
        summary = " ".join(f"rank(s) {ranks}: {type(first).__name__}: {first}".split())[:500]
        try:
            client = MlflowClient(self.tracking_uri)
            tags = client.get_run(self.run_id).data.tags
            count = int(tags.get(WORKER_FAILURES_TAG, "0")) + 1
            client.set_tag(self.run_id, WORKER_FAILURES_TAG, str(count))
            client.set_tag(self.run_id, LAST_WORKER_FAILURE_TAG, summary)
        except Exception as err:  # noqa: BLE001 - bookkeeping must not take the controller down
            print(f"could not record the worker failure on MLflow run {self.run_id}: {err}", flush=True)
