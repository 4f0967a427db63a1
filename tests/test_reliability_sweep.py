"""Issue 9, items 1 and 3 in one real sweep (local Ray cluster, 2-worker DDP trials, sqlite MLflow):

- trial ``lr=0.2``: one of its Ray Train worker processes is SIGKILLed at the start of epoch 1,
  after epoch 0's checkpoint was reported (a test callback, `tests.reliability_gates.WaitForFile`,
  holds the workers there: epochs of 4 tiny steps are over before a poll could catch them); the
  trial restarts from that checkpoint and finishes, in the same MLflow run, each epoch logged once;
- trial ``lr=1e6``: its loss becomes NaN within a few steps; it ends with status NAN_LOSS (not
  retried) and the sweep goes on.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 2
KILL_AT_EPOCH = 1
GOOD_LR, NAN_LR = 0.2, 1.0e6


def _reported_epochs(experiment_dir: Path, lr: float) -> int:
    """How many epochs the trial with this lr has reported to Tune (rows of its result.json)."""
    for path in experiment_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and rows[0]["config"]["trial"]["overrides"]["model.recipe.lr"] == lr:
            return len(rows)
    return 0


def _waiting_workers(gates: Path) -> list[int]:
    """Pids of the Ray Train worker processes waiting at the gate (each wrote ``epoch<N>.pid.<pid>``)."""
    return sorted(int(p.name.rsplit(".", 1)[1]) for p in gates.glob(f"epoch{KILL_AT_EPOCH}.pid.*"))


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory: pytest.TempPathFactory, digits_shards: Path) -> dict:
    root = tmp_path_factory.mktemp("reliability_sweep")
    db = root / "mlflow.db"
    gates = root / "gates"
    sweep = {
        "name": "faults",
        "base": str(REPO / "tasks" / "demo" / "fit.yaml"),
        "overrides": {
            "data.data_dir": str(digits_shards),
            "data.num_workers": 0,
            "data.batch_size": 16,
            "trainer.max_epochs": EPOCHS,
            "trainer.limit_train_batches": 4,
            "trainer.limit_val_batches": 2,
            "trainer.num_sanity_val_steps": 0,
            "trainer.log_every_n_steps": 1,
            "model.ema_decay": None,
            "model.model.num_experts": 0,
            "model.recipe.optimizer": "sgd",
            "model.recipe.warmup_epochs": 0,
            "model.recipe.schedule": "constant",
            "trainer.callbacks": [{"class_path": "tests.reliability_gates.WaitForFile",
                                   "init_args": {"gate_dir": str(gates), "epochs": [KILL_AT_EPOCH], "at": "start"}}],
        },
        "grid": {"model.recipe.lr": [GOOD_LR, NAN_LR]},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "max_concurrent_trials": 1},
        "max_failures": 2,
        "storage_path": str(root / "ray"),
        "mlflow": {"tracking_uri": f"sqlite:///{db}", "experiment_name": "faults"},
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    # PYTHONPATH: Ray's worker processes import the gate callback from tests/.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    log_path = root / "sweep.log"
    killed, reported_at_kill = None, 0
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sweep", str(path), "--verbose", "0"],
                                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 420
            while killed is None and proc.poll() is None and time.time() < deadline:
                # The workers wait at the start of epoch 1, and epoch 0 is reported to Tune (its
                # checkpoint is registered before Tune sees the result): kill one worker.
                reported = _reported_epochs(root / "ray" / "faults", GOOD_LR)
                workers = _waiting_workers(gates)
                if reported >= 1 and len(workers) == 2:
                    killed, reported_at_kill = workers[-1], reported
                    os.kill(killed, signal.SIGKILL)
                    (gates / f"epoch{KILL_AT_EPOCH}.go").touch()  # the restarted workers pass the gate
                    break
                time.sleep(0.2)
            proc.wait(timeout=max(deadline - time.time(), 1))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return {"returncode": proc.returncode, "log": log_path.read_text(), "uri": f"sqlite:///{db}",
            "killed": killed is not None, "reported_at_kill": reported_at_kill}


def _trial_runs(info: dict) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(info["uri"])
    exp = client.get_experiment_by_name("faults")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("condconv.role") == "trial"]
    return client, {float(r.data.params["recipe.lr"]): r for r in runs}


def test_sweep_goes_on_past_a_killed_worker_and_a_nan_trial(failing_sweep: dict) -> None:
    log = failing_sweep["log"]
    assert failing_sweep["killed"], "no worker was killed (the good trial never reported an epoch?): " + log[-4000:]
    assert failing_sweep["returncode"] == 1, log[-4000:]  # one trial failed (the NaN one), not the sweep
    assert "NAN_LOSS" in log and "non-finite training loss" in log, log[-4000:]
    client, runs = _trial_runs(failing_sweep)
    assert sorted(runs) == [GOOD_LR, NAN_LR]  # one MLflow run per trial: the restart was not a new run


def test_killed_worker_resumes_from_its_last_checkpoint(failing_sweep: dict) -> None:
    client, runs = _trial_runs(failing_sweep)
    run = runs[GOOD_LR]
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("condconv.worker_failures") == "1", run.data.tags
    assert run.data.tags.get("condconv.last_worker_failure"), run.data.tags
    # The restarted workers started at the epoch after the last reported one: nothing before it was redone.
    resumed = [int(m.value) for m in client.get_metric_history(run.info.run_id, "resumed_at_epoch")]
    assert failing_sweep["reported_at_kill"] == KILL_AT_EPOCH
    assert resumed == [KILL_AT_EPOCH], resumed
    for key in ("val_top1", "train_loss"):
        history = client.get_metric_history(run.info.run_id, key)
        epochs = sorted(m.step for m in history)
        assert len(epochs) == EPOCHS and len(set(epochs)) == EPOCHS, (key, epochs)  # each epoch exactly once


def test_nan_trial_is_marked_and_not_retried(failing_sweep: dict) -> None:
    client, runs = _trial_runs(failing_sweep)
    run = runs[NAN_LR]
    assert run.info.status == "FAILED"
    assert run.data.tags.get("condconv.status") == "nan_loss"
    assert "non-finite training loss" in run.data.tags.get("condconv.status_detail", "")
    assert "condconv.worker_failures" not in run.data.tags  # a deterministic failure is not retried
    assert client.get_metric_history(run.info.run_id, "val_top1") == []  # stopped within epoch 0
