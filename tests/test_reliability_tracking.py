"""Issue 9, items 2 and 3 without Ray: an unreachable tracker, writes spooled through an outage, NaN losses.

The outage test runs a real `mlflow server` (sqlite store), stops it in the middle of a
`condconv fit` and starts it again; the others use a port nobody listens on and a sqlite store.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline.cli import main as condconv_main
from pipeline.lightning_cli import run_lightning_cli
from pipeline.mlflow_spool import FAST_FAILING_HTTP_DEFAULTS, SpoolingMlflowClient, replay_spool
from tests.test_classification import TINY_SPEC, TinyDataModule

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in tmp_path; undo MLflow's process-wide tracking URI afterwards."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    for name, value in FAST_FAILING_HTTP_DEFAULTS.items():
        monkeypatch.setenv(name, value)  # what the logger sets anyway; restored for the next tests
    yield tmp_path
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite MLflow store for this module's tests (creating one costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def _tiny_config(tracking_uri: str, **trainer) -> dict:
    return {
        "seed_everything": 0,
        "num_threads": 1,
        "model": {"model": {**TINY_SPEC, "num_experts": 0},
                  "recipe": {"optimizer": "sgd", "lr": 0.1, "warmup_epochs": 0, "schedule": "constant"}},
        "data": {"num_train": 64, "num_val": 32, "batch_size": 16},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    **trainer},
        "mlflow": {"tracking_uri": tracking_uri, "experiment_name": "reliability"},
    }


# ----------------------------------------------------------------------------- tracker down at start
def test_fit_with_unreachable_tracker_fails_in_one_line_before_training(workdir, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"
    path = workdir / "fit.yaml"
    path.write_text(yaml.safe_dump(_tiny_config(uri)))
    start = time.monotonic()
    code = run_lightning_cli(["fit", "--config", str(path)], datamodule_class=TinyDataModule)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("condconv fit: error: MLflow tracking server") and uri in err and "unreachable" in err
    assert elapsed < 30  # no minutes of MLflow HTTP retries
    assert not (workdir / "outputs").exists()  # no checkpoint directory: nothing trained


def test_sweep_with_unreachable_tracker_fails_before_ray_starts(workdir, digits_shards, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"
    sweep = {
        "name": "down",
        "base": str(REPO / "tasks" / "demo" / "fit.yaml"),
        "overrides": {"data.data_dir": str(digits_shards)},
        "grid": {"arch": ["mobilenet_v1"], "num_experts": [0]},
        "storage_path": str(workdir / "ray"),
        "mlflow": {"tracking_uri": uri, "experiment_name": "down"},
    }
    path = workdir / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    import ray

    assert condconv_main(["sweep", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == captured.err.strip().splitlines()[0]
    assert captured.err.startswith("condconv sweep: error: MLflow tracking server") and uri in captured.err
    assert not ray.is_initialized() and not (workdir / "ray").exists()


def test_bad_retry_interval_is_a_one_line_config_error(workdir, capsys):
    path = workdir / "fit.yaml"
    config = _tiny_config("unused")
    config["mlflow"]["retry_interval_s"] = -1
    path.write_text(yaml.safe_dump(config))
    assert run_lightning_cli(["fit", "--config", str(path)], datamodule_class=TinyDataModule) == 2
    assert capsys.readouterr().err.strip() == (
        "condconv fit: error: mlflow.retry_interval_s=-1.0; expected a number of seconds >= 0")


def test_mlflow_check_command(capsys):
    uri = f"http://127.0.0.1:{_free_port()}"
    assert condconv_main(["mlflow", "check", "--tracking-uri", uri]) == 2
    assert uri in capsys.readouterr().err


# ----------------------------------------------------------------------------- spool and replay
def test_writes_to_a_dead_tracker_are_spooled_and_replayed_in_order(workdir, store, monkeypatch):
    """Metrics, params, tags, an artifact and the end status survive; replay sends them to the store."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    real = MlflowClient(store)
    run_id = real.create_run(real.create_experiment("spool")).info.run_id
    dead = SpoolingMlflowClient(MlflowClient(f"http://127.0.0.1:{_free_port()}"), workdir / "spool",
                                retry_interval_s=3600)
    artifact = workdir / "notes.txt"
    artifact.write_text("kept")
    for step in range(3):
        dead.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
    dead.log_param(run_id, "lr", "0.1")
    dead.set_tag(run_id, "phase", "outage")
    dead.log_artifact(run_id, str(artifact))
    artifact.unlink()  # the spool holds its own copy
    dead.set_terminated(run_id, "FINISHED")
    spool = workdir / "spool" / f"{run_id}.jsonl"
    assert len(spool.read_text().splitlines()) == 7
    assert real.get_metric_history(run_id, "loss") == []

    # Replaying to the dead tracker keeps everything; to the live store sends everything, once.
    assert replay_spool(spool).remaining == 7
    assert condconv_main(["mlflow", "replay", str(workdir / "spool"), "--tracking-uri", store]) == 0
    assert not spool.exists() and not (workdir / "spool" / f"{run_id}.files").exists()
    run = real.get_run(run_id)
    assert [(m.step, m.value) for m in real.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert run.data.params["lr"] == "0.1" and run.data.tags["phase"] == "outage"
    assert run.info.status == "FINISHED"
    assert [a.path for a in real.list_artifacts(run_id)] == ["notes.txt"]


def test_a_refused_write_is_raised_not_spooled(workdir, store):
    """A client error (here: a run that does not exist) is a bug to see, not an outage to wait out."""
    from mlflow.exceptions import MlflowException

    client = SpoolingMlflowClient(MlflowClient(store), workdir / "spool")
    with pytest.raises(MlflowException):
        client.log_metric("0" * 32, "loss", 1.0)
    assert not (workdir / "spool").exists()


# ----------------------------------------------------------------------------- NaN loss in a fit
def test_fit_with_exploding_lr_stops_at_the_first_nan_with_one_line(workdir, store, capsys):
    """lr 1e6 makes the loss NaN within a few steps; the fit stops there, the run says why."""
    config = _tiny_config(store, max_epochs=3)
    config["model"]["recipe"]["lr"] = 1.0e6
    path = workdir / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    before = torch.get_num_threads()
    try:
        code = run_lightning_cli(["fit", "--config", str(path)], datamodule_class=TinyDataModule)
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("condconv fit: error: non-finite training loss") and "model.recipe.lr" in err[-1]
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("reliability").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["condconv.status"] == "nan_loss"
    # Stopped in the first epoch (4 steps per epoch), before a NaN step was logged.
    steps = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss_step")]
    assert steps and max(s for s, _ in steps) < 4 and all(torch.isfinite(torch.tensor(v)) for _, v in steps)


def test_gradient_clipping_is_a_fit_config_key(workdir):
    """``trainer.gradient_clip_val`` reaches the Trainer (with the recipe's optimizers) and the guard is on."""
    from pipeline.lightning_cli import build_fit
    from pipeline.nonfinite import NonFiniteLossGuard

    parts = build_fit(_tiny_config("unused", gradient_clip_val=0.5, logger=False), datamodule_class=TinyDataModule)
    trainer = parts.make_trainer(logger=False)
    assert trainer.gradient_clip_val == 0.5
    assert sum(isinstance(cb, NonFiniteLossGuard) for cb in trainer.callbacks) == 1


# ----------------------------------------------------------------------------- outage in the middle of a fit
def _start_server(port: int, db: Path, artifacts: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError("mlflow server did not come up: " + log.read_text()[-3000:])


def _stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the server's workers too
    proc.wait(timeout=30)


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"{path} never appeared: " + log.read_text()[-4000:]
        time.sleep(0.2)


@pytest.mark.slow
def test_tracker_outage_in_the_middle_of_a_fit_loses_no_metric(tmp_path, digits_shards):
    """Epoch 0 with the server up, epoch 1 with it down (killed), epoch 2 after a restart: all metrics there.

    A test callback (`tests.reliability_gates.WaitForFile`) holds the fit at the end of epochs 0
    and 1 until the test has stopped / restarted the server, so the outage covers all of epoch 1.
    """
    port = _free_port()
    db, artifacts, server_log = tmp_path / "server.db", tmp_path / "artifacts", tmp_path / "server.log"
    uri = f"http://127.0.0.1:{port}"
    steps_per_epoch, epochs = 4, 3
    gates = tmp_path / "gates"
    config = {
        "seed_everything": 0,
        "num_threads": 1,
        "model": {"model": {**TINY_SPEC, "num_experts": 0},
                  "recipe": {"optimizer": "sgd", "lr": 0.1, "warmup_epochs": 0, "schedule": "constant"}},
        "data": {"data_dir": str(digits_shards), "batch_size": 16, "num_workers": 0, "image_size": 32,
                 "train_augment": "none"},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": epochs, "log_every_n_steps": 1,
                    "limit_train_batches": steps_per_epoch, "limit_val_batches": 2, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "tests.reliability_gates.WaitForFile",
                                   "init_args": {"gate_dir": str(gates), "epochs": [0, 1]}}]},
        "mlflow": {"tracking_uri": uri, "experiment_name": "outage", "retry_interval_s": 1.0,
                   "spool_dir": str(tmp_path / "spool")},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    fit_log = tmp_path / "fit.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = _start_server(port, db, artifacts, server_log)
    fit = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "fit", "--config", str(tmp_path / "fit.yaml")],
                           cwd=tmp_path, env=env, stdout=fit_log.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait_for(gates / "epoch0.reached", fit, fit_log)
        _stop_server(server)
        (gates / "epoch0.go").touch()
        _wait_for(gates / "epoch1.reached", fit, fit_log)
        server = _start_server(port, db, artifacts, server_log)
        (gates / "epoch1.go").touch()
        assert fit.wait(timeout=180) == 0, fit_log.read_text()[-4000:]
    finally:
        if fit.poll() is None:
            fit.kill()
        _stop_server(server)

    text = fit_log.read_text()
    assert "unreachable" in text and "is back: sent" in text, text[-4000:]  # the outage was seen, then healed
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert run.info.status == "FINISHED"
    total = steps_per_epoch * epochs
    for key in ("train_loss_step", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(total)), key
    for key in ("train_loss", "val_loss", "val_top1", "val_top5"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [steps_per_epoch * (e + 1) - 1 for e in range(epochs)], key
    assert "checkpoint_path" in run.data.tags  # set at the end of the fit, after the outage
    assert not list((tmp_path / "spool").glob("*.jsonl"))  # everything was sent
