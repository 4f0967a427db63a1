"""Pareto fronts, the three frontier files, and the MLflow reader/CLI against a real sqlite store."""
from __future__ import annotations

import csv
import random

import pytest

from pipeline.frontier import (
    FrontierPoint,
    format_table,
    frontier_for_sweep,
    frontiers,
    log_frontier_to_mlflow,
    on_front_mask,
    pareto_front,
    points_from_mlflow,
    read_mlflow_runs,
    write_frontier,
)


def pt(name: str, madds: int, acc: float, experts: int = 0, **kw) -> FrontierPoint:
    return FrontierPoint(name=name, madds=madds, accuracy=acc, num_experts=experts, **kw)


def names(points) -> list[str]:
    return [p.name for p in points]


# --------------------------------------------------------------------------- fronts


def test_single_point_is_its_own_front():
    p = pt("only", 100, 50.0)
    assert pareto_front([p]) == [p]
    assert pareto_front([]) == []


def test_all_dominated_but_one():
    best = pt("best", 100, 80.0)
    others = [pt("a", 100, 70.0), pt("b", 200, 80.0), pt("c", 300, 75.0), pt("d", 150, 79.9)]
    assert pareto_front([*others, best]) == [best]


def test_front_sorted_by_madds_and_monotone():
    pts = [pt("c", 300, 75.0), pt("a", 100, 60.0), pt("x", 250, 65.0), pt("b", 200, 70.0)]
    front = pareto_front(pts)
    assert names(front) == ["a", "b", "c"]
    assert [p.accuracy for p in front] == sorted(p.accuracy for p in front)


def test_ties_in_one_coordinate():
    # Same MADDs: only the more accurate survives. Same accuracy: only the cheaper survives.
    pts = [pt("same-cost-worse", 100, 60.0), pt("same-cost-better", 100, 61.0),
           pt("same-acc-cheap", 50, 55.0), pt("same-acc-dear", 80, 55.0)]
    assert names(pareto_front(pts)) == ["same-acc-cheap", "same-cost-better"]


def test_exact_duplicates_keep_one_deterministically():
    pts = [pt("zeta", 100, 70.0), pt("alpha", 100, 70.0), pt("mid", 200, 80.0), pt("alpha", 100, 70.0)]
    expected = ["alpha", "mid"]
    for seed in range(5):
        shuffled = pts[:]
        random.Random(seed).shuffle(shuffled)
        front = pareto_front(shuffled)
        assert names(front) == expected
        # Exactly one of the three (100, 70) points is marked on the front.
        assert sum(on_front_mask(shuffled)) == 2


def test_families_computed_separately():
    static = [pt("s-small", 100, 60.0), pt("s-big", 400, 70.0)]
    # CondConv dominates every static point, yet the static front is still reported.
    cond = [pt("c-small", 90, 65.0, experts=8), pt("c-big", 350, 75.0, experts=4), pt("c-bad", 500, 74.0, experts=8)]
    fronts = frontiers(static + cond)
    assert list(fronts) == ["static", "condconv"]
    assert names(fronts["static"]) == ["s-small", "s-big"]
    assert names(fronts["condconv"]) == ["c-small", "c-big"]
    # The combined front would have dropped the static family entirely.
    assert all(p.family == "condconv" for p in pareto_front(static + cond))
    assert frontiers(cond).keys() == {"condconv"}


def test_bad_points_rejected():
    with pytest.raises(ValueError, match="accuracy=nan"):
        pt("n", 1, float("nan"))
    with pytest.raises(ValueError, match="madds=-1"):
        pt("n", -1, 1.0)
    with pytest.raises(ValueError, match="num_experts=-2"):
        pt("n", 1, 1.0, experts=-2)


def test_format_table_lists_fronts_only():
    pts = [pt("s1", 300_000_000, 71.6, params=3_500_000), pt("s-dominated", 400_000_000, 70.0),
           pt("c1", 329_000_000, 74.6, experts=8, params=27_000_000)]
    table = format_table(pts)
    lines = table.splitlines()
    assert lines[0].startswith("| family") and "MADDs (M)" in lines[0] and "top-1" in lines[0]
    assert "s-dominated" not in table
    assert any("static" in ln and "s1" in ln and "300.0" in ln and "3.50" in ln and "71.60" in ln for ln in lines)
    assert any("condconv" in ln and "c1" in ln and "329.0" in ln and "74.60" in ln for ln in lines)
    assert len(lines) == 4  # header, rule, two front rows


# --------------------------------------------------------------------------- files


@pytest.fixture()
def sweep_points() -> list[FrontierPoint]:
    return [
        pt("mobilenet_v2-w1.0-e0-none", 301_000_000, 71.6, params=3_500_000, arch="mobilenet_v2"),
        pt("mobilenet_v1-w1.0-e0-none", 567_000_000, 71.9, params=4_200_000, arch="mobilenet_v1"),
        pt("mobilenet_v1-w0.5-e0-none", 150_000_000, 63.3, params=1_300_000, arch="mobilenet_v1", width_mult=0.5),
        pt("resnet50-w1.0-e0-none", 4_093_000_000, 70.0, params=25_000_000, arch="resnet50"),  # dominated
        pt("mobilenet_v2-w1.0-e8-paper", 329_000_000, 74.6, experts=8, placement="paper",
           params=27_000_000, arch="mobilenet_v2"),
        pt("mobilenet_v1-w1.0-e8-all", 600_000_000, 73.7, experts=8, placement="all",
           params=30_000_000, arch="mobilenet_v1"),  # dominated by the mobilenet_v2 CondConv
        pt("efficientnet_b0-w1.0-e8-paper", 413_000_000, 78.3, experts=8, placement="paper",
           params=24_000_000, arch="efficientnet_b0"),
    ]


def test_write_frontier_files(tmp_path, sweep_points):
    paths = write_frontier(sweep_points, tmp_path / "out")
    assert set(paths) == {"png", "html", "csv"}
    for path in paths.values():
        assert path.parent == tmp_path / "out" and path.stat().st_size > 0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    html = paths["html"].read_text()
    for p in sweep_points:
        assert p.name in html
    assert '<script src="http' not in html  # plotly.js inlined: opens without internet
    assert "Plotly.newPlot" in html

    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == names(sweep_points)
    on_front = {r["name"] for r in rows if r["on_front"] == "1"}
    expected = {p.name for front in frontiers(sweep_points).values() for p in front}
    assert on_front == expected
    assert "resnet50-w1.0-e0-none" not in on_front and "mobilenet_v1-w1.0-e8-all" not in on_front
    assert {r["family"] for r in rows} == {"static", "condconv"}
    assert float(rows[0]["accuracy"]) == pytest.approx(71.6)


def test_write_frontier_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="no points"):
        write_frontier([], tmp_path)


# --------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real sqlite MLflow store: one sweep parent with trials, plus an older sweep and strays."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sweep-exp", artifact_location=(root / "artifacts").as_uri())

    def run(parent: str | None, role: str, name: str, params: dict, metrics: dict, tags: dict | None = None,
            status: str = "FINISHED") -> str:
        all_tags = {"condconv.role": role, **(tags or {})}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        r = client.create_run(exp, run_name=name, tags=all_tags)
        for k, v in params.items():
            client.log_param(r.info.run_id, k, v)
        for k, values in metrics.items():
            for step, v in enumerate(values):
                client.log_metric(r.info.run_id, k, v, step=step)
        client.set_terminated(r.info.run_id, status=status)
        return r.info.run_id

    old_parent = run(None, "sweep", "old-sweep", {}, {})
    run(old_parent, "trial", "old-trial", {"arch": "resnet50", "num_experts": 0, "madds": 4093000000},
        {"val_top1": [0.5, 0.7]})
    parent = run(None, "sweep", "sweep", {}, {})
    spec = lambda arch, w, e, pl, madds, params: {  # noqa: E731
        "arch": arch, "width_mult": w, "num_experts": e, "placement": pl, "madds": madds, "params": params}
    trials = {
        "mobilenet_v1-w1.0-e0-none": run(parent, "trial", "t0", {**spec("mobilenet_v1", 1.0, 0, "none", 567e6, 4.2e6),
                                                                  "model_name": "mobilenet_v1-w1.0-e0-none"},
                                         {"val_top1": [0.5, 0.719], "val_top1_ema": [0.6, 0.725]}),
        "mobilenet_v1-w0.5-e0-none": run(parent, "trial", "t1", {**spec("mobilenet_v1", 0.5, 0, "none", 150e6, 1.3e6),
                                                                  "model_name": "mobilenet_v1-w0.5-e0-none"},
                                         {"val_top1": [0.4, 0.633], "val_top1_ema": [0.5, 0.64]}),
        # Spec only as tags (params win when both exist; here only tags do).
        "mobilenet_v1-w1.0-e8-paper": run(parent, "trial", "t2", {},
                                          {"val_top1": [0.6, 0.737], "val_top1_ema": [0.7, 0.74]},
                                          tags={**{k: str(v) for k, v in spec("mobilenet_v1", 1.0, 8, "paper", 600e6,
                                                                              30e6).items()},
                                                "model_name": "mobilenet_v1-w1.0-e8-paper"}),
        # No model_name: falls back to the run name.
        "t3-dominated": run(parent, "trial", "t3-dominated", spec("mobilenet_v1", 1.0, 8, "all", 700e6, 40e6),
                            {"val_top1": [0.2, 0.70]}),
    }
    missing_metric = run(parent, "trial", "crashed-early", spec("mobilenet_v1", 1.0, 4, "all", 590e6, 20e6),
                         {"train_loss": [2.0]})
    run(parent, "trial", "still-failed", spec("mobilenet_v1", 1.0, 4, "all", 590e6, 20e6),
        {"val_top1": [0.99]}, status="FAILED")
    return {"uri": uri, "client": client, "parent": parent, "old_parent": old_parent,
            "trials": trials, "missing_metric": missing_metric, "root": root}


def test_points_from_mlflow_reads_children(store):
    points = points_from_mlflow("sweep-exp", store["uri"], parent_run_id=store["parent"])
    by_name = {p.name: p for p in points}
    assert set(by_name) == set(store["trials"])  # no FAILED run, no parent, no other sweep
    p = by_name["mobilenet_v1-w1.0-e0-none"]
    assert p.accuracy == pytest.approx(71.9)  # last logged value, fraction -> percent
    assert (p.madds, p.params, p.num_experts, p.placement, p.arch, p.width_mult) == (
        567_000_000, 4_200_000, 0, "none", "mobilenet_v1", 1.0)
    assert p.family == "static" and p.run_id == store["trials"][p.name]
    tagged = by_name["mobilenet_v1-w1.0-e8-paper"]
    assert (tagged.madds, tagged.num_experts, tagged.family) == (600_000_000, 8, "condconv")
    assert by_name["mobilenet_v1-w0.5-e0-none"].width_mult == 0.5


def test_read_mlflow_counts_skipped_and_metric_override(store):
    read = read_mlflow_runs("sweep-exp", store["uri"], parent_run_id=store["parent"])
    assert read.skipped == {"without metric 'val_top1'": [store["missing_metric"]]}
    assert "skipped 1 run" in read.skip_summary()

    ema = read_mlflow_runs("sweep-exp", store["uri"], parent_run_id=store["parent"], metric="val_top1_ema")
    assert {p.name: round(p.accuracy, 3) for p in ema.points} == {
        "mobilenet_v1-w1.0-e0-none": 72.5, "mobilenet_v1-w0.5-e0-none": 64.0, "mobilenet_v1-w1.0-e8-paper": 74.0}
    assert len(ema.skipped["without metric 'val_top1_ema'"]) == 2

    everything = read_mlflow_runs("sweep-exp", store["uri"])  # whole experiment: the old sweep's trial too
    assert {p.name for p in everything.points} == set(store["trials"]) | {"old-trial"}


def test_unknown_experiment_lists_existing(store):
    with pytest.raises(ValueError, match=r"unknown MLflow experiment 'nope'.*'sweep-exp'"):
        points_from_mlflow("nope", store["uri"])


def test_bad_parent_run_id_rejected(store):
    with pytest.raises(ValueError, match=r"parent_run_id=\"x' or 1=1\""):
        read_mlflow_runs("sweep-exp", store["uri"], parent_run_id="x' or 1=1")


def _artifacts(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, "frontier")}


def test_log_frontier_to_mlflow(store, tmp_path, sweep_points):
    paths = write_frontier(sweep_points, tmp_path)
    logged = log_frontier_to_mlflow(paths, store["old_parent"], store["uri"])
    expected = {"frontier/frontier.png", "frontier/frontier.html", "frontier/frontier.csv"}
    assert set(logged) == expected
    assert _artifacts(store["client"], store["old_parent"]) == expected


def test_frontier_for_sweep(store, tmp_path):
    """What the sweep calls at its end: read its children, write, log onto the parent."""
    paths = frontier_for_sweep("sweep-exp", store["old_parent"], store["uri"], out_dir=tmp_path / "old")
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["name"] for r in rows] == ["old-trial"] and rows[0]["on_front"] == "1"
    assert {"frontier/frontier.csv"} <= _artifacts(store["client"], store["old_parent"])
    with pytest.raises(ValueError, match="no finished runs with metric 'map'"):
        frontier_for_sweep("sweep-exp", store["old_parent"], store["uri"], out_dir=tmp_path, metric="map")


def test_cli_end_to_end_logs_on_latest_sweep(store, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "frontier"
    code = main(["frontier", "--experiment", "sweep-exp", "--tracking-uri", store["uri"], "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for name in ("frontier.png", "frontier.html", "frontier.csv"):
        assert (out / name).stat().st_size > 0
        assert str(out / name) in printed
    # Default parent = the latest sweep run; its children only (not the old sweep's trial).
    assert store["parent"] in printed and "old-trial" not in (out / "frontier.csv").read_text()
    assert "mobilenet_v1-w0.5-e0-none" in printed and "t3-dominated" not in printed  # table shows fronts
    assert "skipped 1 run" in printed
    assert _artifacts(store["client"], store["parent"]) == {
        "frontier/frontier.png", "frontier/frontier.html", "frontier/frontier.csv"}
    local = store["client"].download_artifacts(store["parent"], "frontier/frontier.csv", str(tmp_path / "dl"))
    assert open(local).read() == (out / "frontier.csv").read_text()


def test_cli_explicit_parent_and_ema(store, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "ema"
    code = main(["frontier", "--experiment", "sweep-exp", "--tracking-uri", store["uri"], "--out", str(out),
                 "--parent-run", store["old_parent"], "--all-runs", "--metric", "val_top1", "--ema", "--no-log"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "val_top1_ema" in printed and "val top-1 ema (%)" in printed
    rows = list(csv.DictReader(open(out / "frontier.csv")))
    assert len(rows) == 3  # EMA metric logged by three runs of the whole experiment


def test_cli_errors_are_one_line(store, tmp_path, capsys):
    from pipeline.cli import main

    code = main(["frontier", "--experiment", "nope", "--tracking-uri", store["uri"], "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unknown MLflow experiment 'nope'" in err and "'sweep-exp'" in err

    code = main(["frontier", "--experiment", "sweep-exp", "--tracking-uri", store["uri"], "--out", str(tmp_path),
                 "--metric", "no_such_metric"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no_such_metric" in err and len(err.splitlines()) == 1

    code = main(["frontier", "--experiment", "sweep-exp", "--tracking-uri", store["uri"], "--out", str(tmp_path),
                 "--parent-run", "0" * 32])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--parent-run" in err and "0" * 32 in err
