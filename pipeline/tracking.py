"""MLflow conventions: where runs go, what a run is called, and which params/tags it carries.

Everything that writes to MLflow (the trainer, the sweep) and everything that reads it (the
frontier) uses the names defined here.

- Tracking URI: the config's ``mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else
  ``sqlite:///mlflow.db`` (a local store in the working directory; artifacts in ``./mlruns``).
- Experiment: ``mlflow.experiment_name`` (default ``condconv``). Run name: the model spec's name
  (``mobilenet_v1-w0.25-e4-paper``) unless ``mlflow.run_name`` is set.
- Params: every ModelSpec field under its own name (``arch``, ``width_mult``, ...), ``madds``,
  ``params``, ``model_name``, the recipe as ``recipe.<field>``, plus a few run facts
  (``global_batch_size``, ``lr_peak``, ...). Tags: ``arch``, ``width_mult``, ``num_experts``,
  ``placement``, ``madds``, ``params``, ``model_name`` (the frontier reads params first, then tags).
- Reliability: an ``http(s)`` tracker is checked before a fit or sweep starts (`check_tracker`);
  while it is down during a run, writes wait in a local spool (`pipeline.mlflow_spool`). A run
  stopped by a non-finite loss has the tag ``condconv.status=nan_loss``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Mapping, Optional

from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from pipeline.mlflow_spool import DEFAULT_SPOOL_DIR, SpoolingMLFlowLogger, is_transient

__all__ = [
    "DEFAULT_TRACKING_URI",
    "DEFAULT_EXPERIMENT",
    "ROLE_TAG",
    "ROLE_FIT",
    "ROLE_TRIAL",
    "ROLE_SWEEP",
    "PARENT_RUN_TAG",
    "MODEL_TAG_KEYS",
    "CHECKPOINT_TAG",
    "BEST_CHECKPOINT_TAG",
    "STATUS_TAG",
    "TrackingConfig",
    "TrackerUnreachableError",
    "check_tracker",
    "resolve_tracking_uri",
    "make_logger",
    "model_params",
    "model_tags",
    "recipe_params",
    "log_params",
    "set_tags",
]

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "condconv"

# Run roles: a plain `condconv fit`, one trial of a sweep, the sweep's parent run.
ROLE_TAG = "condconv.role"
ROLE_FIT = "fit"
ROLE_TRIAL = "trial"
ROLE_SWEEP = "sweep"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested (child) runs

# Tags duplicating the model's identity params, so runs that only tag (e.g. a sweep) read alike.
MODEL_TAG_KEYS = ("arch", "width_mult", "num_experts", "placement", "madds", "params", "model_name")
CHECKPOINT_TAG = "checkpoint_path"  # the last checkpoint written (resume from it)
BEST_CHECKPOINT_TAG = "best_checkpoint_path"  # the best by the checkpoint monitor
STATUS_TAG = "condconv.status"  # why a run ended early (e.g. "nan_loss"); absent for a normal run


@dataclass
class TrackingConfig:
    """The ``mlflow:`` block of a training config."""

    tracking_uri: Optional[str] = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment_name: str = DEFAULT_EXPERIMENT
    run_name: Optional[str] = None  # null: the model spec's name
    run_id: Optional[str] = None  # log into this existing run instead of starting one
    tags: Dict[str, str] = field(default_factory=dict)  # extra run tags (e.g. mlflow.parentRunId)
    artifact_location: Optional[str] = None  # for a new experiment; null: the store's default (./mlruns)
    log_checkpoints: bool = False  # upload checkpoints as artifacts at the end (they are large)
    spool_dir: Optional[str] = None  # writes wait here while the tracker is down; null: outputs/mlflow-spool
    retry_interval_s: float = 30.0  # while the tracker is down, try it again this often

    def __post_init__(self) -> None:
        if isinstance(self.retry_interval_s, bool) or not self.retry_interval_s >= 0:
            raise ValueError(f"mlflow.retry_interval_s={self.retry_interval_s!r}; expected a number of seconds >= 0")


class TrackerUnreachableError(ValueError):
    """The configured MLflow tracking server does not answer (reported as one line before any training)."""


def check_tracker(uri: str, timeout_s: float = 5.0) -> None:
    """Raise `TrackerUnreachableError` unless an ``http(s)://`` tracker answers ``GET /health`` in time.

    Other URIs (``sqlite:``, local paths, ``databricks``) are not servers this can probe. Any
    HTTP answer below 500 counts as reachable (a proxy may want credentials for ``/health``).
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - http(s) only
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackerUnreachableError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it or set mlflow.tracking_uri "
            f"(or MLFLOW_TRACKING_URI) to a reachable server or a local store such as sqlite:///mlflow.db"
        ) from None
    if status >= 500:
        raise TrackerUnreachableError(
            f"MLflow tracking server {uri} answers HTTP {status} at /health; wait until it is up or set "
            f"mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to another tracker"
        )


def resolve_tracking_uri(configured: Optional[str] = None) -> str:
    """The tracking URI to use: ``configured``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def make_logger(config: TrackingConfig, run_name: str) -> MLFlowLogger:
    """The Lightning MLflow logger of a run; the run itself is created lazily on first use (rank 0).

    An ``http(s)`` tracker must answer now (`check_tracker`); writes made while it is down later
    are spooled to ``config.spool_dir`` (`SpoolingMLFlowLogger`).
    """
    tags = {ROLE_TAG: ROLE_FIT, **{k: str(v) for k, v in config.tags.items()}}
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    check_tracker(tracking_uri)
    return SpoolingMLFlowLogger(
        experiment_name=config.experiment_name,
        run_name=config.run_name or run_name,
        tracking_uri=tracking_uri,
        tags=tags,
        artifact_location=config.artifact_location,
        run_id=config.run_id,
        log_model=config.log_checkpoints,
        spool_dir=config.spool_dir or DEFAULT_SPOOL_DIR,
        retry_interval_s=config.retry_interval_s,
    )


def _param_value(value: Any) -> str:
    # MLflow stores strings; lists (an explicit placement) as JSON so they read back unambiguously.
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def model_params(spec: Any, madds: int, params: int) -> dict[str, str]:
    """A model's identity as flat MLflow params: every spec field, ``madds``, ``params``, ``model_name``."""
    out = {k: _param_value(v) for k, v in dataclasses.asdict(spec).items()}
    out.update(madds=str(int(madds)), params=str(int(params)), model_name=spec.name)
    return out


def model_tags(spec: Any, madds: int, params: int) -> dict[str, str]:
    """The subset of :func:`model_params` also set as tags (``MODEL_TAG_KEYS``)."""
    identity = model_params(spec, madds, params)
    return {k: identity[k] for k in MODEL_TAG_KEYS}


def recipe_params(recipe: Any) -> dict[str, str]:
    """A recipe dataclass as ``recipe.<field>`` params."""
    return {f"recipe.{k}": _param_value(v) for k, v in dataclasses.asdict(recipe).items()}


def _mlflow_loggers(loggers: Iterable[Logger]) -> list[MLFlowLogger]:
    return [lg for lg in loggers if isinstance(lg, MLFlowLogger)]


@rank_zero_only
def log_params(loggers: Iterable[Logger], params: Mapping[str, Any]) -> None:
    """Log flat params to every logger (rank 0 only).

    MLflow params are write-once: when a run is continued (``mlflow.run_id``, e.g. on resume with
    a larger ``max_epochs``) params it already has keep their first value, with a warning if the
    new value differs, instead of failing the fit.
    """
    for lg in loggers:
        todo = {k: str(v) for k, v in params.items()}
        if isinstance(lg, MLFlowLogger):
            try:
                existing = lg.experiment.get_run(lg.run_id).data.params
            except Exception as err:  # noqa: BLE001
                if not is_transient(err):
                    raise
                existing = {}  # tracker down: log them all (spooled); equal values replay fine
            changed = sorted(k for k, v in todo.items() if k in existing and existing[k] != v[:250])
            if changed:
                warnings.warn(f"MLflow run {lg.run_id} keeps its first values of params {changed} "
                              "(MLflow params cannot change)", stacklevel=2)
            todo = {k: v for k, v in todo.items() if k not in existing}
        if todo:
            lg.log_hyperparams(todo)


@rank_zero_only
def set_tags(loggers: Iterable[Logger], tags: Mapping[str, Any]) -> None:
    """Set tags on the run of every MLflow logger (rank 0 only; other loggers have no tags)."""
    for lg in _mlflow_loggers(loggers):
        client = lg.experiment
        for key, value in tags.items():
            client.set_tag(lg.run_id, key, str(value))
