"""`condconv sweep`: a Ray Tune grid whose trials are Ray Train DDP jobs running the `condconv fit` code.

Flow (Ray 2.60, Train V2): the driver validates every trial config, starts (or joins) a Ray
cluster, opens or reuses the sweep's MLflow parent run, and runs a Tune grid. Each Tune trial is a
small function (`trial_driver`) that gets or creates its MLflow child run and fits a
`TorchTrainer`; its workers run `train_loop` = `build_fit` (the same code as `condconv fit`)
with Ray's DDP strategy, environment and report callback. Metrics flow to Tune through
`TuneReportCallback`; MLflow logging happens on rank 0 only (Lightning's MLflow logger).

Resume: the Tune experiment, the Ray Train runs and the MLflow runs all have deterministic names
(sweep name, trial key), so running the same command again restores the Tune experiment,
skips finished trials, resumes unfinished ones from their last checkpoint and logs into the
same MLflow runs.

Failures: a worker process that dies restarts the trial's worker group from the last epoch's
checkpoint (``max_failures`` times; `pipeline.trial_failures` records it on the MLflow run); a
NaN/inf loss ends the trial with status ``NAN_LOSS`` without retries while the other trials go
on; an unreachable ``http(s)`` tracker is reported before Ray starts.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.sweep_config import SweepConfig, SweepError, Trial, config_key, expand_trials, get_dotted, set_dotted

__all__ = [
    "SweepResult",
    "TrialOutcome",
    "validate_trials",
    "prepare_trials",
    "run_sweep",
    "trial_driver",
    "train_loop",
    "SWEEP_NAME_TAG",
    "TRIAL_KEY_TAG",
]

log = logging.getLogger(__name__)

SWEEP_NAME_TAG = "condconv.sweep"
TRIAL_KEY_TAG = "condconv.trial_key"
DRIVER_CPUS = 0.1  # a Tune trial's own function only waits on its Ray Train run


@dataclass
class TrialOutcome:
    """One trial at the end of a sweep."""

    key: str
    status: str
    metrics: dict[str, Any]
    run_id: Optional[str]
    error: Optional[str] = None


@dataclass
class SweepResult:
    """What a sweep produced: per-trial outcomes, the MLflow parent run and the frontier files."""

    name: str
    parent_run_id: str
    experiment_name: str
    tracking_uri: str
    trials: list[TrialOutcome]
    frontier_paths: dict[str, Path] = field(default_factory=dict)
    frontier_table: str = ""
    metric: str = "val_top1"  # the sweep's frontier metric (fraction), shown in the outcome table


# ----------------------------------------------------------------------------- validation
def _is_local_path(uri: str) -> bool:
    return "://" not in uri and not uri.startswith("pipe:")


def _absolutise(config: dict[str, Any], tracking_uri: str, experiment_name: str) -> None:
    """Make every path in a trial config absolute: Ray workers do not share the driver's cwd."""
    data_key = config_key(config, "data.data_dir")
    data_dir = get_dotted(config, data_key)
    if isinstance(data_dir, str) and _is_local_path(data_dir):
        set_dotted(config, data_key, os.path.abspath(data_dir))
    set_dotted(config, "mlflow.tracking_uri", tracking_uri)
    set_dotted(config, "mlflow.experiment_name", experiment_name)
    from pipeline.mlflow_spool import DEFAULT_SPOOL_DIR

    spool_dir = get_dotted(config, "mlflow.spool_dir") or DEFAULT_SPOOL_DIR
    if isinstance(spool_dir, str):
        set_dotted(config, "mlflow.spool_dir", os.path.abspath(spool_dir))


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///relative.db`` -> ``sqlite:////abs/relative.db``; other URIs unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if _is_local_path(uri) and not uri.startswith("/"):
        return os.path.abspath(uri)
    return uri


def validate_trials(trials: list[Trial]) -> None:
    """Build every trial's fit as `condconv fit` would (module, data module, trainer kwargs), fit nothing.

    The same parser and constructors as the trial itself (`build_fit`), so whatever a trial would
    reject (unknown keys, wrong types, bad values of the model spec, recipe, data module, checkpoint
    or trainer, a missing dataset, a model/data class mismatch) raises `SweepError` naming the trial
    and the problem before Ray starts. Costs the model's construction (~1 s for a ResNet-50 with 8
    experts on a CPU; the data module reads only its manifest).
    """
    import argparse

    import condconv
    from condconv.models.registry import resolve_positions
    from pipeline.classification import DataMismatchError
    from pipeline.lightning_cli import ConfigError, build_fit, one_line_error

    for trial in trials:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_fit({**trial.config, "seed_everything": False})
            spec_fields = get_dotted(trial.config, config_key(trial.config, "model.model")) or {}
            resolve_positions(condconv.ModelSpec(**spec_fields))
        except (argparse.ArgumentError, ConfigError, DataMismatchError, ValueError, TypeError,
                FileNotFoundError) as err:
            raise SweepError(f"trial {trial.key}: {one_line_error(err)}") from None
        except SystemExit:
            raise SweepError(f"trial {trial.key}: invalid fit config") from None


# ----------------------------------------------------------------------------- Ray workers
def _resume_recorder():
    """A callback logging ``resumed_at_epoch`` (metric and tag) to the MLflow run when a fit resumes."""
    from lightning.pytorch.callbacks import Callback

    from pipeline.tracking import set_tags

    class RecordResume(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            if trainer.is_global_zero:
                for lg in trainer.loggers:
                    lg.log_metrics({"resumed_at_epoch": trainer.current_epoch}, step=trainer.global_step)
                set_tags(trainer.loggers, {"condconv.resumed_at_epoch": trainer.current_epoch})

    return RecordResume()


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: the same Lightning fit as `condconv fit`, with Ray's DDP plumbing.

    Returns ``{"status": "ok"}``, or ``{"status": "nan_loss", "error": ...}`` when the loss became
    non-finite: that ends the worker group normally, so Ray Train does not retry a failure that
    would repeat, and `trial_driver` fails the trial.
    """
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    from pipeline.lightning_cli import build_fit
    from pipeline.nonfinite import NAN_LOSS_STATUS, NonFiniteLossError

    use_gpu = loop_config["use_gpu"]
    fit_config = dict(loop_config["fit_config"])
    # RayTrainReportCallback checkpoints every epoch into Ray's storage; no second checkpointer.
    set_dotted(fit_config, "trainer.enable_checkpointing", False)
    checkpoint = ray.train.get_checkpoint()
    parts = build_fit(
        fit_config,
        extra_callbacks=[RayTrainReportCallback(), *([_resume_recorder()] if checkpoint is not None else [])],
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        trainer_overrides={
            "accelerator": "gpu" if use_gpu else "cpu",
            "devices": "auto",
            "enable_progress_bar": False,
        },
    )
    trainer = prepare_trainer(parts.make_trainer())
    try:
        if checkpoint is not None:
            # Restarted after a failure or an interrupted sweep: continue from the last epoch.
            with checkpoint.as_directory() as ckpt_dir:
                ckpt_path = str(Path(ckpt_dir, RayTrainReportCallback.CHECKPOINT_NAME))
                trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=ckpt_path)
        else:
            trainer.fit(parts.module, datamodule=parts.datamodule)
    except NonFiniteLossError as err:
        # Raised on every rank at the same step (the guard reduces its decision over ranks).
        return {"status": NAN_LOSS_STATUS, "error": str(err)}
    return {"status": "ok"}


def _get_or_create_child_run(
    tracking_uri: str, experiment_id: str, parent_run_id: str, trial_key: str, run_name: str, tags: dict[str, str]
) -> tuple[str, Optional[dict[str, float]]]:
    """The MLflow child run of a trial: the existing one when the trial is resumed, else a new one.

    Returns (run id, final metrics if that run already FINISHED, else None).
    """
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import PARENT_RUN_TAG, ROLE_TAG, ROLE_TRIAL, STATUS_TAG

    client = MlflowClient(tracking_uri)
    existing = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and tags.`{TRIAL_KEY_TAG}` = '{trial_key}'",
        max_results=1,
    )
    if existing:
        run = existing[0]
        run_id = run.info.run_id
        if run.info.status == "FINISHED":
            # Its fit completed but the sweep was stopped before Tune recorded it: do not train again.
            return run_id, dict(run.data.metrics)
        client.update_run(run_id, status="RUNNING")
        if STATUS_TAG in run.data.tags:  # a NaN-stopped trial run again: its old status no longer holds
            client.delete_tag(run_id, STATUS_TAG)
        client.set_tag(run_id, "condconv.restarts", str(int(run.data.tags.get("condconv.restarts", "0")) + 1))
        return run_id, None
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={PARENT_RUN_TAG: parent_run_id, TRIAL_KEY_TAG: trial_key, ROLE_TAG: ROLE_TRIAL, **tags},
    )
    return run.info.run_id, None


def trial_driver(config: dict[str, Any]) -> None:
    """Tune trial: get/create the MLflow child run, then run the trial's DDP job as a TorchTrainer."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    import condconv
    from pipeline.nonfinite import NAN_LOSS_STATUS, NonFiniteLossError
    from pipeline.trial_failures import WorkerFailureRecorder

    trial = config["trial"]
    sweep = config["sweep"]
    fit_config = trial["config"]
    spec = condconv.ModelSpec(**(get_dotted(fit_config, config_key(fit_config, "model.model")) or {}))
    run_name = spec.name
    detector = get_dotted(fit_config, "model.init_args.detector")
    if isinstance(detector, dict):  # a detection trial: named after its detector (ssd300-<backbone>)
        from condconv.detection import DetectorSpec

        run_name = DetectorSpec(**detector).name(spec.name, spec.resolution)
    run_id, finished_metrics = _get_or_create_child_run(
        sweep["tracking_uri"], sweep["experiment_id"], sweep["parent_run_id"], trial["key"], run_name,
        {SWEEP_NAME_TAG: sweep["name"]},
    )
    if finished_metrics is not None:
        from ray import tune

        tune.report(finished_metrics)
        return
    set_dotted(fit_config, "mlflow.run_id", run_id)
    res = sweep["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = res["gpus_per_worker"]
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"fit_config": fit_config, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=res["workers_per_trial"], use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            # Deterministic name + storage: a restarted trial resumes this run's checkpoints.
            name=f"{sweep['name']}-{trial['key']}",
            storage_path=sweep["train_storage_path"],
            failure_config=FailureConfig(max_failures=sweep["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback(), WorkerFailureRecorder(sweep["tracking_uri"], run_id)],
        ),
    )
    result = trainer.fit()
    outcome = result.return_value or {}
    if outcome.get("status") == NAN_LOSS_STATUS:
        _mark_nan_loss(sweep["tracking_uri"], run_id, outcome.get("error", ""))
        # An error ends this Tune trial (Tune does not retry it); the sweep goes on with the others.
        raise NonFiniteLossError(f"trial {trial['key']}: {outcome.get('error', 'non-finite loss')}")


def _mark_nan_loss(tracking_uri: str, run_id: str, error: str) -> None:
    """Mark the trial's MLflow run FAILED with ``condconv.status=nan_loss`` (rank 0 did too, unless spooled)."""
    from mlflow.tracking import MlflowClient

    from pipeline.nonfinite import NAN_LOSS_STATUS
    from pipeline.tracking import STATUS_TAG

    try:
        client = MlflowClient(tracking_uri)
        client.set_tag(run_id, STATUS_TAG, NAN_LOSS_STATUS)
        client.set_terminated(run_id, status="FAILED")
    except Exception as err:  # noqa: BLE001 - the trial fails either way; say why the mark is missing
        print(f"could not mark MLflow run {run_id} as nan_loss: {err}", flush=True)


# ----------------------------------------------------------------------------- the sweep
def _init_ray(address: Optional[str], needed_cpus: float) -> bool:
    """Join the cluster named by ``address``/``RAY_ADDRESS``, else start a local one. True if started here."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # A local cluster cannot be preempted, and Ray Train's metrics export has no reader here: skip the
    # extra actor processes they cost per trial (set before ray.init, so Ray's processes inherit it).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    # Logical CPUs: the trials' workers plus their small driver functions may exceed the cores of a
    # laptop; Ray only uses the count for scheduling.
    ray.init(
        num_cpus=max(os.cpu_count() or 1, int(needed_cpus + 0.999)), include_dashboard=False, log_to_driver=True,
        runtime_env={"worker_process_setup_hook": "pipeline.ray_worker_setup.quiet_state_api_warnings"},
    )
    return True


def _check_cluster_resources(sweep: SweepConfig) -> None:
    import ray

    res = sweep.resources
    have = ray.cluster_resources()
    need_gpu = res.workers_per_trial * res.gpus_per_worker
    if need_gpu > have.get("GPU", 0):
        raise SweepError(
            f"a trial needs {need_gpu:g} GPUs (resources.workers_per_trial={res.workers_per_trial} x "
            f"gpus_per_worker={res.gpus_per_worker:g}) but the Ray cluster has {have.get('GPU', 0):g}"
        )
    need_cpu = res.workers_per_trial * res.cpus_per_worker + DRIVER_CPUS
    if need_cpu > have.get("CPU", 0):
        raise SweepError(
            f"a trial needs {need_cpu:g} CPUs (workers_per_trial x cpus_per_worker + {DRIVER_CPUS}) but the "
            f"Ray cluster has {have.get('CPU', 0):g}"
        )


def _parent_run(tracking_uri: str, sweep: SweepConfig, n_trials: int) -> tuple[str, str]:
    """(experiment id, parent run id): reuse the sweep's parent run if this sweep ran before."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import ROLE_SWEEP, ROLE_TAG

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(sweep.experiment_name)
    if experiment is None:
        artifact_location = None
        if tracking_uri.startswith("sqlite:") or _is_local_path(tracking_uri):
            # Next to the store, not in whatever directory a Ray worker happens to run in.
            artifact_location = Path(os.path.abspath("mlruns")).as_uri()
        experiment_id = client.create_experiment(sweep.experiment_name, artifact_location=artifact_location)
    else:
        experiment_id = experiment.experiment_id
    existing = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}' and tags.`{SWEEP_NAME_TAG}` = '{sweep.name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return experiment_id, run_id
    run = client.create_run(experiment_id, run_name=sweep.name, tags={ROLE_TAG: ROLE_SWEEP, SWEEP_NAME_TAG: sweep.name})
    run_id = run.info.run_id
    client.log_text(run_id, sweep.source_text, "sweep.yaml")
    client.log_param(run_id, "num_trials", n_trials)
    client.log_param(run_id, "workers_per_trial", sweep.resources.workers_per_trial)
    client.log_param(run_id, "storage_path", sweep.storage_path)
    return experiment_id, run_id


def _scheduler(sweep: SweepConfig, max_epochs: Optional[int]):
    if sweep.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = sweep.scheduler
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=s.metric,
        mode=s.mode,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
        max_t=max_epochs or 100,
    )


def _storage(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def sweep_tracking_uri(sweep: SweepConfig) -> str:
    """The sweep's MLflow tracking URI (config, else $MLFLOW_TRACKING_URI, else ./mlflow.db), absolute."""
    from pipeline.tracking import resolve_tracking_uri

    return absolute_tracking_uri(resolve_tracking_uri(sweep.tracking_uri))


def prepare_trials(sweep: SweepConfig) -> list[Trial]:
    """Expand the grid, make paths absolute and validate every trial config (no Ray needed)."""
    trials = expand_trials(sweep)
    tracking_uri = sweep_tracking_uri(sweep)
    for trial in trials:
        _absolutise(trial.config, tracking_uri, sweep.experiment_name)
    validate_trials(trials)
    return trials


def run_sweep(sweep: SweepConfig, address: Optional[str] = None, verbose: int = 1) -> SweepResult:
    """Validate, then run (or resume) a sweep, and write its frontier. Raises `SweepError` on bad input."""
    from pipeline.mlflow_spool import set_fast_failing_http_defaults
    from pipeline.tracking import check_tracker

    tracking_uri = sweep_tracking_uri(sweep)
    # Before the trials are built and Ray starts (Ray's processes inherit the HTTP defaults).
    set_fast_failing_http_defaults()
    check_tracker(tracking_uri)
    trials = prepare_trials(sweep)
    print(f"sweep {sweep.name}: {len(trials)} trials x {sweep.resources.workers_per_trial} workers; "
          f"MLflow {tracking_uri} experiment {sweep.experiment_name!r}", flush=True)

    import ray
    from ray import tune

    res = sweep.resources
    needed = res.max_concurrent_trials * (res.workers_per_trial * res.cpus_per_worker + DRIVER_CPUS)
    started = _init_ray(address, needed)
    try:
        _check_cluster_resources(sweep)
        experiment_id, parent_run_id = _parent_run(tracking_uri, sweep, len(trials))
        storage = _storage(sweep.storage_path)
        sweep_info = {
            "name": sweep.name,
            "tracking_uri": tracking_uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent_run_id,
            "resources": {
                "workers_per_trial": res.workers_per_trial,
                "cpus_per_worker": res.cpus_per_worker,
                "gpus_per_worker": res.gpus_per_worker,
            },
            "train_storage_path": os.path.join(storage, sweep.name, "_train"),
            "max_failures": sweep.max_failures,
        }
        trial_dicts = [{"key": t.key, "overrides": t.overrides, "config": t.config} for t in trials]
        trainable = tune.with_resources(trial_driver, {"CPU": DRIVER_CPUS})
        experiment_path = os.path.join(storage, sweep.name)
        if tune.Tuner.can_restore(experiment_path):
            print(f"sweep {sweep.name}: resuming from {experiment_path}", flush=True)
            tuner = tune.Tuner.restore(
                experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                param_space={"sweep": sweep_info, "trial": tune.grid_search(trial_dicts)},
            )
        else:
            max_epochs = get_dotted(trials[0].config, "trainer.max_epochs")
            tuner = tune.Tuner(
                trainable,
                param_space={"sweep": sweep_info, "trial": tune.grid_search(trial_dicts)},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=res.max_concurrent_trials, scheduler=_scheduler(sweep, max_epochs)
                ),
                run_config=tune.RunConfig(name=sweep.name, storage_path=storage, verbose=verbose),
            )
        results = tuner.fit()
        outcomes = _outcomes(results, tracking_uri, experiment_id, parent_run_id)
        result = SweepResult(sweep.name, parent_run_id, sweep.experiment_name, tracking_uri, outcomes,
                             metric=sweep.frontier_metric)
        _finish(result, sweep, storage)
        _report_unsent_spools(sweep.name, trials)
        return result
    finally:
        if started:
            ray.shutdown()


def _report_unsent_spools(name: str, trials: list[Trial]) -> None:
    """Say where MLflow writes wait that no trial could send (the tracker was down when it ended)."""
    dirs = {get_dotted(t.config, "mlflow.spool_dir") for t in trials} - {None}
    for spool_dir in sorted(dirs):
        files = sorted(Path(spool_dir).glob("*.jsonl"))
        if files:
            print(f"sweep {name}: {len(files)} MLflow run(s) have writes the tracker did not get; "
                  f"send them with `condconv mlflow replay {spool_dir}`", flush=True)


def _outcomes(results, tracking_uri: str, experiment_id: str, parent_run_id: str) -> list[TrialOutcome]:
    from mlflow.tracking import MlflowClient

    from pipeline.nonfinite import NAN_LOSS_STATUS
    from pipeline.tracking import PARENT_RUN_TAG, STATUS_TAG

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'")
    run_by_key = {r.data.tags.get(TRIAL_KEY_TAG): r for r in runs}
    outcomes = []
    for r in results:
        key = r.config["trial"]["key"]
        run = run_by_key.get(key)
        status = "ERROR" if r.error else "DONE"
        if r.error and run is not None and run.data.tags.get(STATUS_TAG) == NAN_LOSS_STATUS:
            status = "NAN_LOSS"
        outcomes.append(
            TrialOutcome(
                key=key,
                status=status,
                metrics={k: v for k, v in (r.metrics or {}).items() if isinstance(v, (int, float))},
                run_id=run.info.run_id if run else None,
                error=" ".join(str(r.error).split())[:300] if r.error else None,
            )
        )
    return outcomes


def format_outcomes(result: SweepResult) -> str:
    """The compact end-of-sweep table: trial, status, epochs, the frontier metric (val top-1), MADDs, params."""
    from mlflow.tracking import MlflowClient

    from pipeline.frontier import metric_label

    client = MlflowClient(result.tracking_uri)
    lines = [f"| trial | model | status | epochs | {metric_label(result.metric)} | MADDs (M) | params (M) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for t in result.trials:
        run = client.get_run(t.run_id) if t.run_id else None
        params = run.data.params if run else {}
        top1 = t.metrics.get(result.metric)
        lines.append(
            f"| {t.key} | {run.info.run_name if run else '-'} | {t.status} | {t.metrics.get('epoch', -1) + 1:.0f} | "
            f"{'-' if top1 is None else f'{100 * top1:.2f}'} | "
            f"{float(params['madds']) / 1e6:.2f} | {float(params['params']) / 1e6:.3f} |"
            if "madds" in params
            else f"| {t.key} | - | {t.status} | - | - | - | - |"
        )
    return "\n".join(lines)


def _finish(result: SweepResult, sweep: SweepConfig, storage: str) -> None:
    """Frontier files on the parent run, the tables, and the parent run's final status."""
    from mlflow.tracking import MlflowClient

    from pipeline.frontier import format_table, log_frontier_to_mlflow, metric_label, points_from_mlflow, write_frontier

    client = MlflowClient(result.tracking_uri)
    points = points_from_mlflow(result.experiment_name, result.tracking_uri, result.parent_run_id, sweep.frontier_metric)
    out_dir = Path(storage if "://" not in storage else "outputs/sweeps", sweep.name, "frontier")
    if points:
        label = metric_label(sweep.frontier_metric)
        result.frontier_paths = write_frontier(points, out_dir, metric_name=label)
        log_frontier_to_mlflow(result.frontier_paths, result.parent_run_id, result.tracking_uri)
        result.frontier_table = format_table(points, metric_name=label)
    failed = [t for t in result.trials if t.status != "DONE"]
    client.set_terminated(result.parent_run_id, status="FAILED" if failed else "FINISHED")
