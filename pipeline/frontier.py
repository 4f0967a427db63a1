"""Accuracy-vs-MADD Pareto frontier of a sweep: points, fronts, plots, tables, MLflow I/O.

A sweep trains many (arch, width, experts, placement) variants; each finished trial becomes one
`FrontierPoint`. The frontier answers the paper's question "does CondConv buy more accuracy per
multiply-add than making the static model bigger?", so the front is computed separately for the
static family (``num_experts == 0``) and the CondConv family and the two are drawn together.

Units: ``FrontierPoint.accuracy`` is in percent (0-100), the unit of every plot, table and CSV here.
`points_from_mlflow` converts fractions (what torchmetrics logs) to percent.

This module imports no Ray; MLflow is imported only inside the functions that talk to a tracking
server, so plotting a list of points needs matplotlib and plotly only.
"""
from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

log = logging.getLogger(__name__)

Family = Literal["static", "condconv"]
FAMILIES: tuple[Family, ...] = ("static", "condconv")

# MLflow conventions written by the trainer and the sweep (see pipeline/tracking.py): keep in sync.
ROLE_TAG = "condconv.role"
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
# Keys looked up in a run's params first, then in its tags.
KEY_ARCH = "arch"
KEY_WIDTH = "width_mult"
KEY_EXPERTS = "num_experts"
KEY_PLACEMENT = "placement"
KEY_MADDS = "madds"
KEY_PARAMS = "params"
KEY_NAME = "model_name"

FRONTIER_ARTIFACT_DIR = "frontier"
DEFAULT_OUT_ROOT = Path("outputs/frontier")
# Goes into an MLflow search filter: letters/digits only, so no quoting issues (ids are hex).
_RUN_ID = re.compile(r"[A-Za-z0-9]+")
CSV_COLUMNS = (
    "family", "name", "arch", "width_mult", "num_experts", "placement",
    "madds", "params", "accuracy", "on_front", "run_id",
)


@dataclass(frozen=True)
class FrontierPoint:
    """One trained model: its cost (MADDs, params) and its accuracy in percent."""

    name: str
    madds: int
    accuracy: float
    params: int = 0
    num_experts: int = 0
    placement: str = "none"
    arch: str = ""
    width_mult: float = 1.0
    run_id: str | None = None

    def __post_init__(self) -> None:
        # Reject values that would silently corrupt the dominance test (NaN compares false).
        if not isinstance(self.madds, int) or self.madds < 0:
            raise ValueError(f"FrontierPoint {self.name!r}: madds={self.madds!r}; expected an int >= 0")
        if not isinstance(self.accuracy, (int, float)) or not math.isfinite(self.accuracy):
            raise ValueError(
                f"FrontierPoint {self.name!r}: accuracy={self.accuracy!r}; expected a finite number (percent)"
            )
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ValueError(
                f"FrontierPoint {self.name!r}: num_experts={self.num_experts!r}; expected an int >= 0"
            )

    @property
    def family(self) -> Family:
        """``"static"`` for plain convolutions (``num_experts == 0``), else ``"condconv"``."""
        return "static" if self.num_experts == 0 else "condconv"


# --------------------------------------------------------------------------- fronts


def _front_indices(points: Sequence[FrontierPoint]) -> list[int]:
    """Indices of the non-dominated points, in ascending MADDs."""
    # Sort by cost, then best accuracy first, then a stable identity so that exact duplicates
    # resolve the same way whatever order the runs came back in.
    order = sorted(
        range(len(points)),
        key=lambda i: (points[i].madds, -points[i].accuracy, points[i].name, points[i].run_id or "", i),
    )
    front: list[int] = []
    best = -math.inf
    for i in order:
        # Strictly better accuracy than every cheaper-or-equal point: not dominated. A point with
        # equal accuracy and equal-or-higher MADDs is dominated (or a duplicate) and is dropped.
        if points[i].accuracy > best:
            front.append(i)
            best = points[i].accuracy
    return front


def pareto_front(points: Iterable[FrontierPoint]) -> list[FrontierPoint]:
    """Non-dominated points sorted by MADDs (ascending; accuracy ascends along the front too).

    A point is dominated when another has MADDs <= and accuracy >= with at least one strict.
    Exact ties in both coordinates keep one point: the one with the smallest ``(name, run_id)``,
    so the result does not depend on input order. Families are not separated here; see
    `frontiers`.
    """
    points = list(points)
    return [points[i] for i in _front_indices(points)]


def frontiers(points: Iterable[FrontierPoint]) -> dict[Family, list[FrontierPoint]]:
    """The Pareto front of each family present, computed separately: ``{"static": [...], ...}``."""
    points = list(points)
    return {
        fam: pareto_front(p for p in points if p.family == fam)
        for fam in FAMILIES
        if any(p.family == fam for p in points)
    }


def on_front_mask(points: Sequence[FrontierPoint]) -> list[bool]:
    """For each point, whether it is on its own family's front (what the CSV's ``on_front`` says)."""
    mask = [False] * len(points)
    for fam in FAMILIES:
        members = [i for i, p in enumerate(points) if p.family == fam]
        for j in _front_indices([points[i] for i in members]):
            mask[members[j]] = True
    return mask


# --------------------------------------------------------------------------- outputs


def format_table(points: Iterable[FrontierPoint], metric_name: str = "top-1 (%)") -> str:
    """A markdown table of each family's front: family, name, MADDs (M), params (M), accuracy."""
    rows = [
        (fam, p.name, f"{p.madds / 1e6:.1f}", f"{p.params / 1e6:.2f}", f"{p.accuracy:.2f}")
        for fam, front in frontiers(points).items()
        for p in front
    ]
    header = ("family", "name", "MADDs (M)", "params (M)", metric_name)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    numeric = (False, False, True, True, True)

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def write_frontier_csv(points: Sequence[FrontierPoint], path: Path) -> Path:
    """Write every point with its family and ``on_front`` flag to ``path``."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for p, on_front in zip(points, on_front_mask(points)):
            writer.writerow([
                p.family, p.name, p.arch, p.width_mult, p.num_experts, p.placement,
                p.madds, p.params, f"{p.accuracy:.4f}", int(on_front), p.run_id or "",
            ])
    return path


def metric_label(metric: str) -> str:
    """Axis/table label of a metric name: ``val_top1`` -> ``val top-1 (%)``, ``map`` -> ``map (%)``."""
    return re.sub(r"top(\d)", r"top-\1", metric).replace("_", " ") + " (%)"


def safe_dirname(name: str) -> str:
    """An experiment name as one folder name (``/`` and spaces become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


# Same colours in the PNG and the HTML: static blue, CondConv orange.
_COLOURS: Mapping[Family, str] = {"static": "#1f77b4", "condconv": "#ff7f0e"}
_LABELS: Mapping[Family, str] = {"static": "static", "condconv": "CondConv"}
# Beyond this many points a label on every point is unreadable; label only the fronts.
_MAX_LABELLED_POINTS = 30


def _use_log_x(points: Sequence[FrontierPoint]) -> bool:
    # ResNet-50 (4 GMADDs) next to MobileNets (0.1-0.6 GMADDs) squashes a linear axis.
    madds = [p.madds for p in points if p.madds > 0]
    return bool(madds) and max(madds) / min(madds) > 8


def write_frontier_png(points: Sequence[FrontierPoint], path: Path, metric_name: str = "val top-1 (%)") -> Path:
    """Scatter every point coloured by family and draw each family's front as a step line."""
    # Figure + Agg canvas directly: no pyplot global state, no display needed, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(9, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    fronts = frontiers(points)
    mask = on_front_mask(points)
    label_all = len(points) <= _MAX_LABELLED_POINTS
    for fam in FAMILIES:
        members = [p for p in points if p.family == fam]
        if not members:
            continue
        colour = _COLOURS[fam]
        ax.scatter([p.madds / 1e6 for p in members], [p.accuracy for p in members],
                   color=colour, alpha=0.55, s=28, label=f"{_LABELS[fam]} runs")
        front = fronts[fam]
        # "post" steps: past a front point, the best reachable accuracy stays flat until the next one.
        ax.step([p.madds / 1e6 for p in front], [p.accuracy for p in front], where="post",
                color=colour, linewidth=1.8, marker="o", label=f"{_LABELS[fam]} front")
    for p, on_front in zip(points, mask):
        if label_all or on_front:
            ax.annotate(p.name, (p.madds / 1e6, p.accuracy), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=_COLOURS[p.family])
    if _use_log_x(points):
        ax.set_xscale("log")
        # Plain numbers ("300", "4000") on a log axis instead of "3x10^2"; minor ticks labelled at
        # 2, 3 and 5 x 10^k only, so neighbouring labels do not collide.
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""
        ))
    ax.set_xlabel("MADDs per image (millions)")
    ax.set_ylabel(metric_name)
    ax.set_title(f"{metric_name} vs MADDs: static vs CondConv")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def write_frontier_html(points: Sequence[FrontierPoint], path: Path, metric_name: str = "val top-1 (%)") -> Path:
    """Interactive plotly plot with plotly.js embedded (works offline): runs, labels, hover, fronts."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fronts = frontiers(points)
    hover = (
        "<b>%{text}</b><br>MADDs: %{x:.1f}M<br>" + metric_name + ": %{y:.2f}<br>"
        "params: %{customdata[0]:.2f}M<br>experts: %{customdata[1]}<br>placement: %{customdata[2]}<br>"
        "arch: %{customdata[3]} (width %{customdata[4]})<extra></extra>"
    )
    for fam in FAMILIES:
        members = [p for p in points if p.family == fam]
        if not members:
            continue
        fig.add_trace(go.Scatter(
            x=[p.madds / 1e6 for p in members], y=[p.accuracy for p in members],
            mode="markers+text", text=[p.name for p in members], textposition="top center",
            textfont={"size": 9}, name=f"{_LABELS[fam]} runs",
            marker={"color": _COLOURS[fam], "size": 9, "opacity": 0.7},
            customdata=[[p.params / 1e6, p.num_experts, p.placement, p.arch, p.width_mult] for p in members],
            hovertemplate=hover,
        ))
        front = fronts[fam]
        fig.add_trace(go.Scatter(
            x=[p.madds / 1e6 for p in front], y=[p.accuracy for p in front], mode="lines",
            line={"color": _COLOURS[fam], "shape": "hv", "width": 2}, name=f"{_LABELS[fam]} front",
            hoverinfo="skip",
        ))
    fig.update_layout(
        title=f"{metric_name} vs MADDs: static vs CondConv",
        xaxis_title="MADDs per image (millions)", yaxis_title=metric_name, template="plotly_white",
    )
    if _use_log_x(points):
        fig.update_xaxes(type="log")
    # include_plotlyjs=True inlines plotly.js: the file must open on machines without internet.
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path


def write_frontier(
    points: Iterable[FrontierPoint], out_dir: str | Path, metric_name: str = "val top-1 (%)"
) -> dict[str, Path]:
    """Write ``frontier.png``, ``frontier.html`` and ``frontier.csv`` to ``out_dir``; returns ``{kind: path}``."""
    points = list(points)
    if not points:
        raise ValueError("write_frontier: no points to plot; expected at least one finished run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "png": write_frontier_png(points, out / "frontier.png", metric_name),
        "html": write_frontier_html(points, out / "frontier.html", metric_name),
        "csv": write_frontier_csv(points, out / "frontier.csv"),
    }


# --------------------------------------------------------------------------- MLflow


@dataclass
class MlflowRead:
    """What `read_mlflow_runs` found: the points and, per reason, the ids of the runs it skipped."""

    points: list[FrontierPoint]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    metric: str = "val_top1"

    def skip_summary(self) -> str:
        """One line such as ``skipped 2 runs: 1 without metric 'val_top1', 1 without 'madds'``."""
        if not self.skipped:
            return ""
        n = sum(len(v) for v in self.skipped.values())
        parts = ", ".join(f"{len(v)} {reason}" for reason, v in self.skipped.items())
        return f"skipped {n} run{'s' if n != 1 else ''}: {parts}"


def _lookup(run, key: str) -> str | None:
    # The trainer logs the model spec as params; the sweep may only tag. Params win.
    value = run.data.params.get(key)
    return value if value is not None else run.data.tags.get(key)


def _as_int(text: str) -> int:
    # MLflow stores params as strings; "4.13e8" and "413000000.0" are both valid MADD counts.
    return int(round(float(text)))


def mlflow_client(tracking_uri: str | None = None):
    """An `mlflow.MlflowClient` for ``tracking_uri`` (None: MLFLOW_TRACKING_URI or MLflow's default)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def get_experiment_id(client, experiment: str) -> str:
    """The id of experiment ``experiment``; ValueError listing the existing ones if it does not exist."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(
            f"unknown MLflow experiment {experiment!r} at {client.tracking_uri}; existing: "
            + (", ".join(repr(n) for n in names) or "none")
        )
    return exp.experiment_id


def _search_all(client, experiment_id: str, filter_string: str, order_by: list[str] | None = None) -> list:
    runs: list = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def latest_sweep_run_id(client, experiment_id: str) -> str | None:
    """The id of the most recently started sweep parent run (tag ``condconv.role=sweep``), if any."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _scale_to_percent(raw: list[float], scale: float | None) -> float:
    if scale is not None:
        return scale
    # Torchmetrics logs fractions; a run set whose values all lie in [0, 1] is read as fractions.
    return 100.0 if raw and all(0.0 <= v <= 1.0 for v in raw) else 1.0


def read_mlflow_runs(
    experiment: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    metric: str = "val_top1",
    scale: float | None = None,
) -> MlflowRead:
    """Read the finished runs of ``experiment`` (only children of ``parent_run_id`` if given).

    Sweep parent runs (tag ``condconv.role=sweep``) are never points. Each run needs the metric
    (its last logged value) and the ``madds`` param/tag; runs without them are skipped and counted.
    ``scale`` multiplies the metric into percent; None: x100 if every value lies in [0, 1].
    """
    if parent_run_id is not None and not _RUN_ID.fullmatch(parent_run_id):
        raise ValueError(f"parent_run_id={parent_run_id!r}; expected an MLflow run id (letters and digits)")
    client = mlflow_client(tracking_uri)
    experiment_id = get_experiment_id(client, experiment)
    filters = ["attributes.status = 'FINISHED'"]
    if parent_run_id is not None:
        filters.append(f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}'")
    runs = _search_all(client, experiment_id, " and ".join(filters), order_by=["attributes.start_time ASC"])

    skipped: dict[str, list[str]] = {}
    rows: list[tuple[object, float]] = []
    for run in runs:
        if run.data.tags.get(ROLE_TAG) == ROLE_SWEEP:
            continue
        value = run.data.metrics.get(metric)
        if value is None or not math.isfinite(value):
            skipped.setdefault(f"without metric {metric!r}", []).append(run.info.run_id)
            continue
        if _lookup(run, KEY_MADDS) is None:
            skipped.setdefault(f"without {KEY_MADDS!r}", []).append(run.info.run_id)
            continue
        rows.append((run, float(value)))

    factor = _scale_to_percent([v for _, v in rows], scale)
    points = []
    for run, value in rows:
        try:
            points.append(_point_from_run(run, value * factor))
        except ValueError as err:
            skipped.setdefault("with unreadable params", []).append(run.info.run_id)
            log.warning("run %s: %s", run.info.run_id, err)
    return MlflowRead(points=points, skipped=skipped, metric=metric)


def _point_from_run(run, accuracy: float) -> FrontierPoint:
    arch = _lookup(run, KEY_ARCH) or ""
    width = float(_lookup(run, KEY_WIDTH) or 1.0)
    experts = _as_int(_lookup(run, KEY_EXPERTS) or "0")
    placement = _lookup(run, KEY_PLACEMENT) or ("none" if experts == 0 else "paper")
    name = (
        _lookup(run, KEY_NAME)
        or run.data.tags.get(RUN_NAME_TAG)
        or run.info.run_name
        or f"{arch}-w{width}-e{experts}-{placement}"
    )
    return FrontierPoint(
        name=name,
        madds=_as_int(_lookup(run, KEY_MADDS)),
        accuracy=accuracy,
        params=_as_int(_lookup(run, KEY_PARAMS) or "0"),
        num_experts=experts,
        placement=placement,
        arch=arch,
        width_mult=width,
        run_id=run.info.run_id,
    )


def points_from_mlflow(
    experiment: str,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    metric: str = "val_top1",
) -> list[FrontierPoint]:
    """Frontier points of the finished runs of an MLflow experiment; see `read_mlflow_runs`."""
    result = read_mlflow_runs(experiment, tracking_uri, parent_run_id, metric)
    if result.skipped:
        log.warning("%s", result.skip_summary())
    return result.points


def log_frontier_to_mlflow(paths: Mapping[str, Path], run_id: str, tracking_uri: str | None = None) -> list[str]:
    """Log the frontier files as artifacts of ``run_id`` under ``frontier/``; returns the artifact paths."""
    client = mlflow_client(tracking_uri)
    logged = []
    for path in paths.values():
        client.log_artifact(run_id, str(path), artifact_path=FRONTIER_ARTIFACT_DIR)
        logged.append(f"{FRONTIER_ARTIFACT_DIR}/{Path(path).name}")
    return logged


def frontier_for_sweep(
    experiment: str,
    parent_run_id: str,
    tracking_uri: str | None = None,
    out_dir: str | Path | None = None,
    metric: str = "val_top1",
) -> dict[str, Path]:
    """Read a sweep's finished trials, write the three frontier files and log them onto its parent run.

    ``out_dir`` defaults to ``outputs/frontier/<experiment>``. Raises ValueError when no trial
    has the metric yet.
    """
    read = read_mlflow_runs(experiment, tracking_uri, parent_run_id=parent_run_id, metric=metric)
    if not read.points:
        raise ValueError(
            f"no finished runs with metric {metric!r} and a 'madds' param among the children of run "
            f"{parent_run_id} in experiment {experiment!r}"
        )
    if read.skipped:
        log.warning("%s", read.skip_summary())
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT_ROOT / safe_dirname(experiment)
    paths = write_frontier(read.points, out, metric_name=metric_label(metric))
    log_frontier_to_mlflow(paths, parent_run_id, tracking_uri)
    return paths

