"""Sweep files: loading, grid expansion and validation, all before any trial starts."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.sweep import prepare_trials
from pipeline.sweep_config import SweepError, expand_trials, load_sweep

REPO = Path(__file__).resolve().parent.parent
DEMO_FIT = REPO / "tasks" / "demo" / "fit.yaml"


def write_sweep(tmp_path: Path, **fields) -> Path:
    doc = {"name": "t", "base": str(DEMO_FIT), "grid": {"width_mult": [0.25]}, **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_grid_union_expands_with_aliases_and_no_duplicates(tmp_path: Path) -> None:
    path = write_sweep(
        tmp_path,
        grid=[
            {"arch": ["mobilenet_v1"], "width_mult": [0.25, 0.5], "num_experts": [0]},
            {"arch": ["mobilenet_v1"], "width_mult": [0.25], "num_experts": [0, 2, 4]},
        ],
        overrides={"trainer.max_epochs": 3},
    )
    sweep = load_sweep(path)
    trials = expand_trials(sweep)
    assert len(trials) == 4  # (0.25, e0) appears in both products once
    assert len({t.key for t in trials}) == 4
    for t in trials:
        assert t.config["trainer"]["max_epochs"] == 3
        assert t.config["model"]["model"]["arch"] == "mobilenet_v1"
    assert sorted(t.config["model"]["model"]["num_experts"] for t in trials) == [0, 0, 2, 4]
    # the base config is not mutated between trials
    assert load_sweep(path).base_config == sweep.base_config


def test_demo_sweep_has_three_widths_and_three_expert_counts() -> None:
    trials = expand_trials(load_sweep(REPO / "tasks" / "sweeps" / "demo.yaml"))
    static = {t.config["model"]["model"]["width_mult"] for t in trials if t.config["model"]["model"]["num_experts"] == 0}
    experts = {t.config["model"]["model"]["num_experts"] for t in trials} - {0}
    assert len(static) >= 3 and len(experts) >= 3


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"grid": {}}, "grid is empty"),
        ({"grid": {"width_mult": []}}, "has no values"),
        ({"gird": {"a": [1]}}, "unknown key 'gird'"),
        ({"resources": {"workers": 2}}, "unknown key resources.workers"),
        ({"resources": {"workers_per_trial": 0}}, "workers_per_trial=0"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type='hyperband'"),
        ({"base": "missing.yaml"}, "base config 'missing.yaml' not found"),
        ({"name": "a b"}, "name='a b'"),
    ],
)
def test_bad_sweep_files_fail_with_one_line(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(SweepError, match=message) as info:
        load_sweep(write_sweep(tmp_path, **fields))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "grid,message",
    [
        ({"model.recipe.lrr": [0.1]}, "lrr"),
        ({"arch": ["vgg"]}, "vgg"),
        ({"num_experts": [4], "placement": [[99]]}, "block 99"),
        ({"data.batch_size": ["many"]}, "batch_size"),
    ],
)
def test_bad_trial_configs_fail_before_ray(tmp_path: Path, grid: dict, message: str, digits_shards: Path) -> None:
    path = write_sweep(tmp_path, grid=grid, overrides={"data.data_dir": str(digits_shards)})
    with pytest.raises(SweepError, match=message):
        prepare_trials(load_sweep(path))


def test_missing_dataset_is_reported_before_ray(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, overrides={"data.data_dir": str(tmp_path / "nowhere")})
    with pytest.raises(SweepError, match="nowhere.*manifest.json"):
        prepare_trials(load_sweep(path))


def test_cli_dry_run_and_one_line_error(tmp_path: Path, digits_shards: Path, capsys: pytest.CaptureFixture) -> None:
    good = write_sweep(tmp_path, grid={"num_experts": [0, 2]}, overrides={"data.data_dir": str(digits_shards)})
    assert main(["sweep", str(good), "--dry-run"]) == 0
    assert "2 valid trials" in capsys.readouterr().out
    bad = write_sweep(tmp_path, grid={"num_experts": [-1]}, overrides={"data.data_dir": str(digits_shards)})
    assert main(["sweep", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "num_experts=-1" in err and len(err.splitlines()) == 1


def test_imagenet_table1_sweep_expands_to_the_papers_ten_runs() -> None:
    trials = expand_trials(load_sweep(REPO / "tasks" / "sweeps" / "imagenet.yaml"))
    pairs = {(t.config["model"]["model"]["arch"], t.config["model"]["model"]["num_experts"]) for t in trials}
    archs = {"mobilenet_v1", "mobilenet_v2", "mnasnet_a1", "resnet50", "efficientnet_b0"}
    assert pairs == {(a, e) for a in archs for e in (0, 8)}
    assert all(t.config["model"]["model"].get("placement", "paper") == "paper" for t in trials)
