"""The routing report: figures and an HTML page of a model's per-layer routing statistics.

Written by ``condconv routing CHECKPOINT`` and, with ``routing_report: true``, at the end of a fit
(logged to the MLflow run under ``routing/``). Files in the output folder:

- ``class_means.png``: per layer, a heatmap of the class-mean routing weights (classes x experts);
- ``histograms.png``: per layer, the histogram of all its routing weights (with Sarle's BC);
- ``specificity.png``: class specificity and bimodality by depth;
- ``routing_stats.csv``: one row per layer; ``index.html``: the table and the figures.

The statistics themselves are `condconv.routing_stats` (no plotting or tracking there).
"""
from __future__ import annotations

import csv
import html
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from condconv.routing_stats import UNIFORM_BIMODALITY, LayerRoutingStats, analyze_routing

__all__ = [
    "REPORT_FILES",
    "MLFLOW_ARTIFACT_DIR",
    "write_routing_report",
    "routing_report",
    "log_routing_report",
]

REPORT_FILES = ("class_means.png", "histograms.png", "specificity.png", "routing_stats.csv", "index.html")
MLFLOW_ARTIFACT_DIR = "routing"
CSV_COLUMNS = (
    "depth", "layer", "experts", "examples", "specificity", "bimodality", "extreme_fraction", "mean", "std",
)
_MAX_CLASS_TICKS = 20  # label every class up to this many (ImageNet's 1000 rows stay unlabelled)


def _figure(width: float, height: float):
    # Figure + Agg canvas directly: no pyplot global state, no display, safe in worker threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def _adjust_grid(fig, rows: int) -> None:
    # Fixed spacing instead of tight_layout, which costs seconds on a grid of dozens of axes.
    fig.subplots_adjust(left=0.06, right=0.97, bottom=0.05, top=1.0 - 0.9 / fig.get_figheight(),
                        hspace=0.55 if rows > 1 else 0.2, wspace=0.45)


def _short(name: str) -> str:
    return name.removesuffix(".routing") or name


def _write_class_means(stats: Sequence[LayerRoutingStats], path: Path, class_names: Optional[Sequence[str]]) -> Path:
    rows, cols = _grid(len(stats))
    fig = _figure(3.6 * cols, 3.0 * rows + 0.6)
    for i, s in enumerate(stats):
        ax = fig.add_subplot(rows, cols, i + 1)
        # Own colour scale per layer: the class differences, not the layers' overall levels, are the point.
        im = ax.imshow(s.class_means.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
        experts = s.class_means.shape[1]
        ax.set_xticks(range(0, experts, max(1, experts // 8)))
        ax.set_title(f"{_short(s.name)}  spec {s.specificity:.2f}", fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        n_classes = s.class_means.shape[0]
        if n_classes <= _MAX_CLASS_TICKS:
            ax.set_yticks(range(n_classes))
            labels = list(class_names) if class_names is not None and len(class_names) == n_classes else range(n_classes)
            ax.set_yticklabels([str(c) for c in labels], fontsize=6)
        ax.set_ylabel("class", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("Class-mean routing weights per layer", fontsize=10)
    _adjust_grid(fig, rows)
    fig.savefig(path)
    return path


def _write_histograms(stats: Sequence[LayerRoutingStats], path: Path) -> Path:
    rows, cols = _grid(len(stats))
    fig = _figure(3.4 * cols, 2.4 * rows + 0.6)
    for i, s in enumerate(stats):
        ax = fig.add_subplot(rows, cols, i + 1)
        edges = s.bin_edges.numpy()
        ax.bar(edges[:-1], s.histogram.numpy(), width=edges[1:] - edges[:-1], align="edge", color="#ff7f0e")
        ax.set_xlim(0.0, 1.0)
        ax.set_title(f"{_short(s.name)}  BC {s.bimodality:.2f}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("Routing weight histograms (BC: Sarle's bimodality coefficient; uniform = 0.56)", fontsize=10)
    _adjust_grid(fig, rows)
    fig.savefig(path)
    return path


def _write_specificity(stats: Sequence[LayerRoutingStats], path: Path) -> Path:
    fig = _figure(max(6.0, 0.45 * len(stats) + 2), 4.2)
    ax = fig.add_subplot()
    depth = [s.depth for s in stats]
    ax.plot(depth, [s.specificity for s in stats], marker="o", color="#1f77b4", label="class specificity")
    ax.plot(depth, [s.bimodality for s in stats], marker="s", color="#ff7f0e", label="bimodality (Sarle)")
    ax.axhline(UNIFORM_BIMODALITY, color="#ff7f0e", linestyle=":", linewidth=1, label="BC of a uniform")
    ax.set_xticks(depth)
    ax.set_xticklabels([_short(s.name) for s in stats], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("routing function (by depth)")
    ax.set_title("Routing class specificity and bimodality by depth")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _row(s: LayerRoutingStats) -> dict[str, object]:
    return {
        "depth": s.depth, "layer": s.name, "experts": s.num_experts, "examples": s.num_examples,
        "specificity": round(s.specificity, 4), "bimodality": round(s.bimodality, 4),
        "extreme_fraction": round(s.extreme_fraction, 4), "mean": round(s.mean, 4), "std": round(s.std, 4),
    }


def _write_csv(stats: Sequence[LayerRoutingStats], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for s in stats:
            writer.writerow(_row(s))
    return path


def _write_html(stats: Sequence[LayerRoutingStats], path: Path, title: str, notes: Sequence[str]) -> Path:
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in CSV_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in _row(s).values()) + "</tr>" for s in stats
    )
    figures = "".join(
        f'<h2>{esc(caption)}</h2><p><img src="{name}" alt="{esc(caption)}" style="max-width:100%"></p>'
        for name, caption in (
            ("specificity.png", "Specificity and bimodality by depth"),
            ("class_means.png", "Class-mean routing per layer"),
            ("histograms.png", "Routing weight histograms"),
        )
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} td:nth-child(2){{text-align:left}}</style>
</head><body>
<h1>{esc(title)}</h1>
{''.join(f'<p>{esc(n)}</p>' for n in notes)}
<p>Specificity: between-class / total variance of each expert's routing weight, averaged over experts
(0: the class does not matter, 1: the weight is a function of the class). Bimodality: Sarle's coefficient
of all the layer's weights (uniform 0.56, two separated peaks &rarr; 1). extreme_fraction: weights within
0.1 of 0 or 1. See docs/routing.md.</p>
<table><tr>{head}</tr>{body}</table>
{figures}
<p>Data: <a href="routing_stats.csv">routing_stats.csv</a></p>
</body></html>
"""
    path.write_text(page)
    return path


def write_routing_report(
    stats: Sequence[LayerRoutingStats],
    out_dir: str | Path,
    title: str = "Routing report",
    class_names: Optional[Sequence[str]] = None,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write the report files (`REPORT_FILES`) of ``stats`` to ``out_dir``; returns ``{file name: path}``."""
    stats = list(stats)
    if not stats:
        raise ValueError("write_routing_report: no layer statistics; expected a model with CondConv routing")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _write_class_means(stats, out / "class_means.png", class_names),
        _write_histograms(stats, out / "histograms.png"),
        _write_specificity(stats, out / "specificity.png"),
        _write_csv(stats, out / "routing_stats.csv"),
        _write_html(stats, out / "index.html", title, notes),
    ]
    return {p.name: p for p in paths}


def routing_report(
    model: nn.Module,
    batches: Iterable[Sequence[torch.Tensor]],
    out_dir: str | Path,
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    max_batches: Optional[int] = None,
    title: str = "Routing report",
    notes: Sequence[str] = (),
) -> tuple[list[LayerRoutingStats], dict[str, Path]]:
    """Analyze ``model``'s routing on ``(images, labels)`` batches and write the report; returns (stats, paths)."""
    stats = analyze_routing(model, batches, num_classes=num_classes, max_batches=max_batches)
    n = stats[0].num_examples
    paths = write_routing_report(stats, out_dir, title, class_names, [*notes, f"{n} examples."])
    return stats, paths


def log_routing_report(loggers: Iterable[object], out_dir: str | Path) -> list[str]:
    """Upload a written report folder to every MLflow logger's run under ``routing/``; returns the run ids."""
    from lightning.pytorch.loggers import MLFlowLogger

    run_ids = []
    for lg in loggers:
        if isinstance(lg, MLFlowLogger):
            lg.experiment.log_artifacts(lg.run_id, str(out_dir), artifact_path=MLFLOW_ARTIFACT_DIR)
            run_ids.append(lg.run_id)
    return run_ids
