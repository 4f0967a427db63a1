"""`condconv fit --config tasks/detection/demo.yaml` end to end on tiny generated data: MLflow run with
COCO mAP and the detector's MADDs, readable by the frontier code with ``metric=val_map``."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_config_fits_and_logs_map_and_madds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import condconv
    from condconv.detection import create_detector
    from pipeline.cli import main
    from pipeline.frontier import read_mlflow_runs

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["data", "shapes", "raw", "--num-train", "16", "--num-val", "8", "--size", "64"]) == 0
    assert main(["data", "coco-to-wds", "raw", "wds", "--shard-size", "8"]) == 0
    code = main([
        "fit", "--config", str(REPO / "tasks/detection/demo.yaml"),
        "--data.init_args.data_dir", "wds", "--data.init_args.image_size", "64", "--data.init_args.batch_size", "8",
        "--model.init_args.model.resolution", "64",
        "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
        "--mlflow.tracking_uri", uri, "--mlflow.experiment_name", "det-test",
    ])
    assert code == 0
    read = read_mlflow_runs("det-test", tracking_uri=uri, metric="val_map")
    assert len(read.points) == 1, read.skip_summary()
    point = read.points[0]
    assert point.name == "ssd64-mobilenet_v1-w0.25-e4-paper" and point.num_experts == 4
    expected = create_detector("mobilenet_v1", width_mult=0.25, num_experts=4, resolution=64, num_classes=3)
    assert point.madds == condconv.count_madds(expected, resolution=64)
    assert 0.0 <= point.accuracy <= 100.0
    assert list(Path("outputs/checkpoints", point.name).glob("epoch=000-val_map=*.ckpt"))

    # A model/data mismatch is one config error before anything runs.
    code = main(["fit", "--config", str(REPO / "tasks/detection/demo.yaml"), "--data.init_args.data_dir", "wds",
                 "--model.init_args.model.num_classes", "5", "--mlflow.tracking_uri", uri])
    assert code == 2


def test_missing_detection_data_is_one_line_naming_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # The data module is a class_path choice, so jsonargparse wraps its error in a Union report; the
    # user must see the cause, not the report.
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(REPO / "tasks/detection/demo.yaml"),
                 "--data.init_args.data_dir", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "data_dir=" in err and "no manifest.json" in err and "coco-to-wds" in err
    assert "Union subtypes" not in err and "NoneType" not in err
