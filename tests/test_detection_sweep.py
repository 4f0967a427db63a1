"""The detection sweep: grid aliases land in the class_path blocks, and its trials validate as fits."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_detection_sweep_expands_into_class_path_blocks(tmp_path: Path) -> None:
    from pipeline.data.coco_wds import convert_coco_to_wds
    from pipeline.data.shapes import write_shapes
    from pipeline.sweep import validate_trials
    from pipeline.sweep_config import config_key, expand_trials, get_dotted, load_sweep

    sweep = load_sweep(REPO / "tasks/sweeps/detection_demo.yaml")
    assert sweep.frontier_metric == "val_map"
    trials = expand_trials(sweep)
    grid = sorted((get_dotted(t.config, "model.init_args.model.width_mult"),
                   get_dotted(t.config, "model.init_args.model.num_experts")) for t in trials)
    assert grid == [(0.25, 0), (0.25, 2), (0.25, 4), (0.25, 8), (0.5, 0), (1.0, 0)]
    for t in trials:
        assert "model" not in t.config["model"] and "data_dir" not in t.config["data"]  # nothing beside init_args
        assert get_dotted(t.config, "data.init_args.batch_size") == 16
    assert config_key(trials[0].config, "data.data_dir") == "data.init_args.data_dir"
    assert config_key({"data": {"data_dir": "x"}}, "data.data_dir") == "data.data_dir"  # classification unchanged

    write_shapes(tmp_path / "raw", num_train=4, num_val=2, size=64)
    convert_coco_to_wds(tmp_path / "raw", tmp_path / "wds")
    trial = trials[3]
    trial.config["data"]["init_args"]["data_dir"] = str(tmp_path / "wds")
    validate_trials([trial])  # builds the DetectionModule and data module as the trial would


def test_detection_sweep_without_its_data_is_one_line_naming_the_converter(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)  # the sweep's relative data_dir does not exist here
    code = main(["sweep", str(REPO / "tasks/sweeps/detection_demo.yaml"), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "data_dir=" in err and "no manifest.json" in err and "coco-to-wds" in err
    assert "Union subtypes" not in err and "NoneType" not in err
