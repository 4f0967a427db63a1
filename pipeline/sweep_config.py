"""Sweep YAML -> `SweepConfig` -> one fit config per trial, all validated before Ray starts.

A sweep file::

    name: demo                       # Tune experiment name and MLflow parent run name
    base: ../demo/fit.yaml           # a `condconv fit` config (or a list, merged in order)
    overrides: {trainer.max_epochs: 2}   # dotted keys applied to every trial
    grid:                            # a product of values, or a list of products (their union)
      - {arch: [mobilenet_v1], width_mult: [0.25, 0.5, 1.0], num_experts: [0]}
      - {arch: [mobilenet_v1], width_mult: [0.25], num_experts: [2, 4, 8]}
    resources: {workers_per_trial: 2, cpus_per_worker: 1, gpus_per_worker: 0, max_concurrent_trials: 1}
    scheduler: {type: asha, grace_period: 1}   # optional (default: none, every trial runs fully)
    storage_path: outputs/sweeps     # Ray results and checkpoints (local path, s3://, gs://)
    mlflow: {tracking_uri: null, experiment_name: condconv-sweeps}

Grid keys are dotted names of the fit config (``model.recipe.lr``); ``arch``, ``width_mult``,
``depth_mult``, ``num_experts``, ``placement`` and ``routing`` are short for ``model.model.<key>``.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from pipeline.config_merge import deep_merge

__all__ = [
    "SweepError",
    "Resources",
    "SchedulerConfig",
    "SweepConfig",
    "Trial",
    "load_sweep",
    "expand_trials",
    "set_dotted",
    "get_dotted",
    "config_key",
    "MODEL_ALIASES",
]

MODEL_ALIASES = ("arch", "width_mult", "depth_mult", "num_experts", "placement", "routing")
TOP_LEVEL_KEYS = ("name", "base", "overrides", "grid", "resources", "scheduler", "storage_path", "mlflow", "frontier", "max_failures")
SCHEDULERS = ("none", "asha")


class SweepError(ValueError):
    """The sweep file is invalid (reported as one line before any trial starts)."""


@dataclass
class Resources:
    """What one trial needs: a DDP job of ``workers_per_trial`` workers."""

    workers_per_trial: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 1


@dataclass
class SchedulerConfig:
    """Early stopping of trials: ``asha`` (ASHA, Li et al.) or ``none``."""

    type: str = "none"
    grace_period: int = 1
    reduction_factor: int = 2
    metric: str = "val_top1"
    mode: str = "max"


@dataclass
class SweepConfig:
    """A validated sweep: the base fit config, the trials' overrides and how to run them."""

    name: str
    base_config: dict[str, Any]
    grid: list[dict[str, list[Any]]]
    overrides: dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    storage_path: str = "outputs/sweeps"
    tracking_uri: Optional[str] = None
    experiment_name: str = "condconv-sweeps"
    frontier_metric: str = "val_top1"
    max_failures: int = 2  # restarts of a trial's worker group after a worker process dies
    source_path: Optional[Path] = None
    source_text: str = ""


@dataclass(frozen=True)
class Trial:
    """One point of the grid: its stable key, the overrides that define it, its full fit config."""

    key: str
    overrides: dict[str, Any]
    config: dict[str, Any]


def _fail(path: Optional[Path], message: str) -> SweepError:
    where = f"{path}: " if path else ""
    return SweepError(f"{where}{message}")


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``config["a"]["b"]["c"] = value`` for ``dotted="a.b.c"``, creating dicts on the way."""
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise SweepError(f"grid/override key {dotted!r}: {part!r} is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def get_dotted(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` for ``dotted="a.b"``, or ``default``."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _canonical_key(key: str) -> str:
    return f"model.model.{key}" if key in MODEL_ALIASES else key


def _dataclass_from(cls: type, raw: Any, section: str, path: Optional[Path]) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise _fail(path, f"{section!r} must be a mapping, got {raw!r}")
    fields = cls.__dataclass_fields__
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise _fail(path, f"unknown key {section}.{unknown[0]}; accepted: {sorted(fields)}")
    try:
        return cls(**raw)
    except TypeError as err:
        raise _fail(path, f"{section}: {err}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML `true` is not a count


def _check_resources(res: Resources, path: Optional[Path]) -> None:
    if not _is_int(res.workers_per_trial) or res.workers_per_trial < 1:
        raise _fail(path, f"resources.workers_per_trial={res.workers_per_trial!r}; expected an int >= 1")
    for name in ("cpus_per_worker", "gpus_per_worker"):
        value = getattr(res, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise _fail(path, f"resources.{name}={value!r}; expected a number >= 0")
    if not _is_int(res.max_concurrent_trials) or res.max_concurrent_trials < 1:
        raise _fail(path, f"resources.max_concurrent_trials={res.max_concurrent_trials!r}; expected an int >= 1")


def _check_scheduler(sched: SchedulerConfig, path: Optional[Path]) -> None:
    if sched.type not in SCHEDULERS:
        raise _fail(path, f"scheduler.type={sched.type!r}; expected one of {list(SCHEDULERS)}")
    if sched.mode not in ("max", "min"):
        raise _fail(path, f"scheduler.mode={sched.mode!r}; expected 'max' or 'min'")
    if not _is_int(sched.grace_period) or sched.grace_period < 1:
        raise _fail(path, f"scheduler.grace_period={sched.grace_period!r}; expected an int >= 1 (epochs)")
    if not _is_int(sched.reduction_factor) or sched.reduction_factor < 2:
        raise _fail(path, f"scheduler.reduction_factor={sched.reduction_factor!r}; expected an int >= 2")
    if not isinstance(sched.metric, str) or not sched.metric:
        raise _fail(path, f"scheduler.metric={sched.metric!r}; expected a metric name such as 'val_top1'")


def _optional_str(raw: Mapping[str, Any], key: str, section: str, path: Optional[Path]) -> Optional[str]:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise _fail(path, f"{section}{key}={value!r}; expected a non-empty string")
    return value


def _normalise_grid(raw: Any, path: Optional[Path]) -> list[dict[str, list[Any]]]:
    if raw is None or raw == [] or raw == {}:
        raise _fail(path, "grid is empty; expected a mapping of keys to value lists (or a list of such mappings)")
    products = raw if isinstance(raw, list) else [raw]
    grid = []
    for i, product in enumerate(products):
        if not isinstance(product, Mapping) or not product:
            raise _fail(path, f"grid[{i}] is {product!r}; expected a non-empty mapping of keys to value lists")
        norm = {}
        for key, values in product.items():
            if not isinstance(key, str) or not key:
                raise _fail(path, f"grid key {key!r} is not a dotted config name")
            if not isinstance(values, list):
                values = [values]
            if not values:
                raise _fail(path, f"grid key {key!r} has no values; expected a non-empty list")
            norm[_canonical_key(key)] = values
        grid.append(norm)
    return grid


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def load_sweep(path: str | Path, name: Optional[str] = None) -> SweepConfig:
    """Read and validate a sweep YAML (structure only; trial configs are checked by `expand_trials`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise _fail(path, f"not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, Mapping):
        raise _fail(path, "a sweep file must be a mapping")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise _fail(path, f"unknown key {unknown[0]!r}; accepted: {list(TOP_LEVEL_KEYS)}")
    sweep_name = name or raw.get("name") or path.stem
    if not isinstance(sweep_name, str) or not _NAME_RE.match(sweep_name):
        raise _fail(path, f"name={sweep_name!r}; expected letters, digits, '.', '_' or '-'")

    bases = raw.get("base")
    if bases is None:
        raise _fail(path, "missing 'base': the fit config(s) every trial starts from")
    bases = bases if isinstance(bases, list) else [bases]
    base_config: dict[str, Any] = {}
    for base in bases:
        if not isinstance(base, str) or not base:
            raise _fail(path, f"base={base!r}; expected the path of a fit config (or a list of paths)")
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.is_file():
            raise _fail(path, f"base config {str(base)!r} not found (looked at {base_path})")
        loaded = yaml.safe_load(base_path.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise _fail(path, f"base config {str(base)!r} is not a mapping")
        base_config = deep_merge(base_config, loaded)

    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise _fail(path, f"overrides must be a mapping of dotted keys to values, got {overrides!r}")
    bad_keys = [k for k in overrides if not isinstance(k, str) or not k]
    if bad_keys:
        raise _fail(path, f"overrides key {bad_keys[0]!r} is not a dotted config name")
    overrides = {_canonical_key(k): v for k, v in overrides.items()}

    resources = _dataclass_from(Resources, raw.get("resources"), "resources", path)
    _check_resources(resources, path)
    scheduler = _dataclass_from(SchedulerConfig, raw.get("scheduler"), "scheduler", path)
    _check_scheduler(scheduler, path)

    mlflow_raw = raw.get("mlflow") or {}
    if not isinstance(mlflow_raw, Mapping) or set(mlflow_raw) - {"tracking_uri", "experiment_name"}:
        raise _fail(path, f"mlflow: accepted keys are ['experiment_name', 'tracking_uri'], got {mlflow_raw!r}")
    frontier_raw = raw.get("frontier") or {}
    if not isinstance(frontier_raw, Mapping) or set(frontier_raw) - {"metric"}:
        raise _fail(path, f"frontier: accepted keys are ['metric'], got {frontier_raw!r}")
    _optional_str(mlflow_raw, "tracking_uri", "mlflow.", path)
    _optional_str(mlflow_raw, "experiment_name", "mlflow.", path)
    _optional_str(frontier_raw, "metric", "frontier.", path)
    _optional_str(raw, "storage_path", "", path)
    max_failures = raw.get("max_failures", 2)
    if not _is_int(max_failures) or max_failures < 0:
        raise _fail(path, f"max_failures={max_failures!r}; expected an int >= 0 (retries of a failed worker group)")

    return SweepConfig(
        name=sweep_name,
        base_config=base_config,
        grid=_normalise_grid(raw.get("grid"), path),
        overrides=dict(overrides),
        resources=resources,
        scheduler=scheduler,
        storage_path=str(raw.get("storage_path") or "outputs/sweeps"),
        tracking_uri=mlflow_raw.get("tracking_uri"),
        experiment_name=str(mlflow_raw.get("experiment_name") or "condconv-sweeps"),
        frontier_metric=str(frontier_raw.get("metric") or "val_top1"),
        max_failures=max_failures,
        source_path=path,
        source_text=text,
    )


def _short_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ".".join(_short_value(v) for v in value)
    text = str(value)
    return re.sub(r"[^A-Za-z0-9_.:-]", "", text)[:24]


_KEY_PREFIX = {"arch": "", "width_mult": "w", "depth_mult": "d", "num_experts": "e", "placement": "p", "routing": "r"}


def trial_key(overrides: Mapping[str, Any]) -> str:
    """A stable, readable key of one grid point (used as Ray Train run name and MLflow tag)."""
    parts = []
    for k, v in sorted(overrides.items(), key=lambda kv: (kv[0].split(".")[-1] != "arch", kv[0])):
        last = k.split(".")[-1]
        prefix = _KEY_PREFIX.get(last, f"{last}=") if k.startswith("model.model.") else f"{last}="
        parts.append(f"{prefix}{_short_value(v)}")
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return ("_".join(parts)[:80] + "_" + digest).replace(":", "")


def config_key(config: Mapping[str, Any], dotted: str) -> str:
    """Where ``dotted`` lives in ``config``: ``model.x`` / ``data.x`` become ``model.init_args.x`` /
    ``data.init_args.x`` when that block names its class (``class_path``, e.g. detection configs).

    So grid keys and aliases (``arch`` = ``model.model.arch``) read the same for every task.
    """
    head, _, rest = dotted.partition(".")
    block = config.get(head)
    if rest and head in ("model", "data") and isinstance(block, Mapping) and "class_path" in block \
            and not rest.startswith(("init_args", "class_path")):
        return f"{head}.init_args.{rest}"
    return dotted


def expand_trials(sweep: SweepConfig) -> list[Trial]:
    """Every grid point (union of the products, duplicates removed) as a full fit config."""
    trials, seen = [], set()
    for product in sweep.grid:
        keys = list(product)
        for values in itertools.product(*(product[k] for k in keys)):
            overrides = dict(zip(keys, values))
            key = trial_key(overrides)
            if key in seen:
                continue
            seen.add(key)
            config = copy.deepcopy(sweep.base_config)
            for dotted, value in {**sweep.overrides, **overrides}.items():
                set_dotted(config, config_key(config, dotted), value)
            trials.append(Trial(key=key, overrides=overrides, config=config))
    return trials
