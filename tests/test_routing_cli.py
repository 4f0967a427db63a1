"""`condconv routing CHECKPOINT` on a model trained by `condconv fit` on the digits; the fit's own report."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

import condconv
from pipeline.cli import main as condconv_main
from pipeline.routing_report import MLFLOW_ARTIFACT_DIR, REPORT_FILES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in tmp_path (outputs/ and the MLflow store land there); one torch thread; undo MLflow's globals."""
    previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
    threads = torch.get_num_threads()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(previous_uri)  # MLFlowLogger sets it process-wide


def _check_report(out: Path) -> None:
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    for png in ("class_means.png", "histograms.png", "specificity.png"):
        with Image.open(out / png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 300
        assert f'src="{png}"' in (out / "index.html").read_text()


def test_fit_with_annealed_routing_then_routing_report(workdir: Path, digits_shards: Path, capsys) -> None:
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    # Two short epochs of annealed softmax (start 5 over 4 epochs): epoch 1 trains at T = 4.
    code = condconv_main([
        "fit", "--config", str(REPO / "tasks/demo/fit.yaml"),
        "--data.data_dir", str(digits_shards), "--data.batch_size", "32",
        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--model.model.routing", "softmax_anneal", "--model.model.routing_temperature", "5",
        "--model.model.routing_anneal_epochs", "4", "--model.routing_report", "true",
        "--mlflow.tracking_uri", tracking_uri, "--mlflow.experiment_name", "routing-test",
    ])
    assert code == 0
    run_name = "mobilenet_v1-w0.25-e4-paper-softmax_anneal5x4"
    ckpt = workdir / "outputs/checkpoints" / run_name / "last.ckpt"
    assert ckpt.is_file()

    # The fit logged the annealed temperature per epoch and the routing report as artifacts.
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("routing-test").experiment_id])[0]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "routing_temperature")] == [5.0, 4.0]
    logged = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, MLFLOW_ARTIFACT_DIR)}
    assert set(REPORT_FILES) <= logged

    # The checkpoint keeps the last temperature; `condconv routing` rebuilds the model from it.
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert float(state["model.blocks.0.routing.temperature"]) == 4.0
    out = workdir / "report"
    capsys.readouterr()
    assert condconv_main(["routing", str(ckpt), "--data", str(digits_shards), "--out", str(out),
                          "--max-batches", "2", "--batch-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "blocks.12.routing" in printed and "64 examples" in printed
    _check_report(out)
    rows = (out / "routing_stats.csv").read_text().splitlines()
    assert rows[0].startswith("depth,layer,experts") and len(rows) == 1 + 14  # 13 blocks + FC
    assert condconv_main(["routing", str(ckpt), "--data", str(digits_shards), "--out", str(workdir / "ema"),
                          "--max-batches", "1", "--ema"]) == 0
    _check_report(workdir / "ema")


def test_routing_cli_bad_input_is_one_line(workdir: Path, digits_shards: Path, capsys) -> None:
    assert condconv_main(["routing", "missing.ckpt", "--data", str(digits_shards)]) == 2
    assert "does not exist" in capsys.readouterr().err
    static = workdir / "static.ckpt"
    spec = condconv.ModelSpec(arch="mobilenet_v1", width_mult=0.25, resolution=32, num_classes=10)
    model = condconv.create_model(spec)
    torch.save({"hyper_parameters": {"model": dataclasses.asdict(spec)},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, static)
    assert condconv_main(["routing", str(static), "--data", str(digits_shards)]) == 2
    err = capsys.readouterr().err
    assert "no RoutingFn" in err and len(err.strip().splitlines()) == 1
    assert condconv_main(["routing", str(static), "--data", str(digits_shards), "--ema"]) == 2
    assert "no EMA weights" in capsys.readouterr().err
