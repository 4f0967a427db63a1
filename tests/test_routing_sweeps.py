"""The ablation sweep files: the ImageNet ones load and expand, the demo ones validate every trial."""
from __future__ import annotations

from pathlib import Path

import pytest

import condconv
from condconv.models.registry import resolve_positions
from pipeline.sweep import prepare_trials
from pipeline.sweep_config import expand_trials, load_sweep

SWEEPS = Path(__file__).resolve().parents[1] / "tasks" / "sweeps"


def _specs(trials) -> list[condconv.ModelSpec]:
    return [condconv.ModelSpec(**t.config["model"]["model"]) for t in trials]


@pytest.mark.parametrize("name,count", [("ablation_experts", 28), ("ablation_placement", 7), ("ablation_routing", 7)])
def test_imagenet_ablations_load_and_expand(name: str, count: int) -> None:
    # The ImageNet shards are absent here: check the grid and every model spec, not the data.
    sweep = load_sweep(SWEEPS / f"{name}.yaml")
    trials = expand_trials(sweep)
    specs = _specs(trials)
    assert len(trials) == count and len({s.name for s in specs}) == count
    for spec in specs:
        resolve_positions(spec)
        assert spec.arch == "mobilenet_v1" and spec.resolution == 224 and spec.num_classes == 1000
    if name == "ablation_experts":
        assert {s.num_experts for s in specs} == {0, 1, 2, 4, 8, 16, 32}
        assert {s.width_mult for s in specs} == {0.25, 0.5, 0.75, 1.0}


@pytest.mark.parametrize("name", ["demo_experts", "demo_placement", "demo_routing"])
def test_demo_ablations_validate_every_trial(name: str, digits_shards: Path, tmp_path: Path) -> None:
    sweep = load_sweep(SWEEPS / f"{name}.yaml")
    sweep.overrides["data.data_dir"] = str(digits_shards)  # the shards of a clean clone
    sweep.storage_path = str(tmp_path)
    trials = prepare_trials(sweep)  # what `condconv sweep FILE --dry-run` runs
    specs = _specs(trials)
    assert len(trials) == 7 and len({s.name for s in specs}) == 7
    assert specs[0].num_experts == 0  # every ablation has the static baseline
    if name == "demo_routing":
        assert {(s.routing, s.routing_scope) for s in specs[1:]} == {
            (r, scope) for r in ("sigmoid", "softmax", "softmax_anneal") for scope in ("block", "layer")}
        assert all(t.config["model"]["routing_report"] for t in trials)
