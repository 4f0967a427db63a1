"""Issue 9, item 5: fuzzed bad fit and sweep configs end in one line naming the key, before any trial starts.

Hypothesis mutates a valid config (the demo's, on the session's digits shards) in one place: an
unknown key, a value of the wrong type, a bad enum value (arch, placement, routing, optimizer ...),
a negative size, a missing data path. Every mutation must be refused by the same validation the
commands run first (`build_fit` for `condconv fit`, `load_sweep` + `prepare_trials` for
`condconv sweep`) with an error type the CLI reports as one line, whose text names the key (and,
for an enum, every accepted value). A few real `condconv` subprocesses check the exit code, the
single stderr line and the absence of a traceback; `ray.init` is booby-trapped to show a bad sweep
is refused before Ray starts.
"""
from __future__ import annotations

import argparse
import copy
import os
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from condconv.layers import ROUTING_KINDS
from condconv.models.registry import list_models
from condconv.routing import ROUTING_SCOPES
from pipeline.classification import DataMismatchError
from pipeline.data.transforms import TRAIN_AUGMENTS
from pipeline.lightning_cli import ConfigError, build_fit, load_config, one_line_error
from pipeline.sweep import prepare_trials
from pipeline.sweep_config import SweepError, load_sweep, set_dotted

REPO = Path(__file__).resolve().parents[1]
DEMO_FIT = REPO / "tasks" / "demo" / "fit.yaml"
# What `condconv fit` reports as one line (run_lightning_cli) and `condconv sweep` likewise (cli.main).
FIT_CONFIG_ERRORS = (argparse.ArgumentError, ConfigError, DataMismatchError)
SWEEP_CONFIG_ERRORS = (SweepError, FileNotFoundError)
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_N", 25)), deadline=None, derandomize=not os.environ.get("FUZZ_N"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

ENUMS: dict[str, list[str]] = {
    "model.model.arch": list_models(),
    "model.model.routing": list(ROUTING_KINDS),
    "model.model.routing_scope": list(ROUTING_SCOPES),
    "model.model.placement": ["paper", "all", "none", "last:K"],
    "model.recipe.optimizer": ["rmsprop_tf", "sgd", "adamw"],
    "model.recipe.schedule": ["exponential_step", "cosine", "step", "constant"],
    "data.train_augment": list(TRAIN_AUGMENTS),
    "trainer.accelerator": ["auto", "gpu", "cpu", "cuda", "mps", "tpu"],
    "checkpoint.mode": ["min", "max"],
}
# Keys whose value must be a number of at least this (sizes, counts, rates); below it is refused.
MINIMA: dict[str, float] = {
    "model.model.width_mult": 1e-9, "model.model.depth_mult": 1e-9, "model.model.num_experts": 0,
    "model.model.resolution": 1, "model.model.num_classes": 1, "model.recipe.lr": 1e-12,
    "model.recipe.lr_batch_size": 1, "model.recipe.weight_decay": 0, "model.recipe.label_smoothing": 0,
    "data.batch_size": 1, "data.num_workers": 0, "data.image_size": 1, "data.shuffle_buffer": 0,
    "trainer.max_epochs": -1, "trainer.max_steps": -1, "trainer.devices": 1, "num_threads": 1,
}
INT_KEYS = [k for k in MINIMA if k.split(".")[-1] in {
    "num_experts", "resolution", "num_classes", "lr_batch_size", "batch_size", "num_workers", "image_size",
    "shuffle_buffer", "max_epochs", "max_steps", "devices", "num_threads"}]
SECTIONS = ["", "model", "model.model", "model.recipe", "data", "trainer", "mlflow", "checkpoint"]

words = st.text(alphabet=string.ascii_lowercase + "_", min_size=2, max_size=10).filter(lambda w: w.strip("_"))


def base_fit_config(data_dir: Path, tmp: Path) -> dict[str, Any]:
    """The demo fit config on the digits shards, with an MLflow store in ``tmp`` (valid as is)."""
    config = load_config(DEMO_FIT)
    config["data"]["data_dir"] = str(data_dir)
    config["mlflow"]["tracking_uri"] = f"sqlite:///{tmp}/mlflow.db"
    return config


def _key_named(message: str, dotted: str) -> bool:
    return dotted.split(".")[-1].lower() in message.lower()


# --------------------------------------------------------------------------- mutations
@st.composite
def fit_mutations(draw, data_root: Path) -> tuple[str, Any, list[str]]:
    """(dotted key, bad value, words the error must contain) for one bad fit config."""
    kind = draw(st.sampled_from(["unknown", "enum", "negative", "wrong_type", "missing_data"]))
    if kind == "unknown":
        section = draw(st.sampled_from(SECTIONS))
        name = draw(words.map(lambda w: "zz_" + w))  # never an accepted key
        dotted = f"{section}.{name}" if section else name
        return dotted, draw(st.integers(0, 9)), [name]
    if kind == "enum":
        dotted = draw(st.sampled_from(sorted(ENUMS)))
        accepted = ENUMS[dotted]
        value = draw(words.filter(lambda w: w not in accepted and w.lower() not in accepted))
        # jsonargparse names Literal values one way, our checks another: the key plus every value.
        return dotted, value, [value, *[a.split(":")[0] for a in accepted]]
    if kind == "negative":
        dotted = draw(st.sampled_from(sorted(MINIMA)))
        low = MINIMA[dotted]
        value = draw(st.integers(-1000, int(low) - 1 if low >= 1 else -2)) if dotted in INT_KEYS else \
            draw(st.floats(-1e3, low, exclude_max=True, allow_nan=False).map(lambda v: min(v, -1e-3)))
        if dotted == "trainer.devices":  # -1 means "all devices"; anything below is refused
            value = min(value, -2)
        return dotted, value, [dotted.split(".")[-1] if dotted != "trainer.devices" else "devices"]
    if kind == "wrong_type":
        dotted = draw(st.sampled_from(INT_KEYS + ["model.recipe.lr", "model.model.width_mult", "model.ema_decay"]))
        value = draw(st.one_of(words.map(lambda w: w + "!"), st.lists(st.integers(), min_size=1, max_size=3),
                               st.dictionaries(words, st.integers(), min_size=1, max_size=2)))
        return dotted, value, [dotted.split(".")[-1]]
    name = draw(words)
    return "data.data_dir", str(data_root / "no-such-dir" / name), ["data_dir", name]


def _mutated(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    config = copy.deepcopy(config)
    set_dotted(config, dotted, value)
    return config


# --------------------------------------------------------------------------- fit
def test_fuzz_base_fit_config_is_valid(digits_shards, tmp_path):
    """The base config is valid (otherwise every 'bad' mutation below would pass vacuously)."""
    parts = build_fit({**base_fit_config(digits_shards, tmp_path), "seed_everything": False})
    assert parts.module.spec.num_classes == 10 and parts.datamodule.num_classes == 10


@FUZZ
@given(data=st.data())
def test_bad_fit_configs_fail_with_one_line_naming_the_key(digits_shards, tmp_path, data):
    dotted, value, needles = data.draw(fit_mutations(tmp_path))
    config = _mutated(base_fit_config(digits_shards, tmp_path), dotted, value)
    with pytest.raises(Exception) as info:
        build_fit({**config, "seed_everything": False})
    err = info.value
    assert isinstance(err, FIT_CONFIG_ERRORS), f"{dotted}={value!r}: {type(err).__name__} would be a traceback: {err}"
    line = one_line_error(err)
    for needle in needles:
        assert needle.lower() in line.lower(), f"{dotted}={value!r}: {needle!r} not in {line!r}"


# --------------------------------------------------------------------------- sweep
@st.composite
def sweep_mutations(draw, data_dir: Path, tmp: Path) -> tuple[dict[str, Any], str]:
    """(a bad sweep document, a word the error must contain)."""
    doc: dict[str, Any] = {"name": "fuzz", "base": str(DEMO_FIT), "grid": {"num_experts": [0, 2]},
                           "overrides": {"data.data_dir": str(data_dir)},
                           "mlflow": {"tracking_uri": f"sqlite:///{tmp}/mlflow.db"}}
    kind = draw(st.sampled_from(["top_unknown", "resources", "scheduler", "max_failures", "base", "grid",
                                 "grid_value", "name", "data"]))
    if kind == "top_unknown":
        key = draw(words.map(lambda w: "zz_" + w))
        doc[key] = 1
        return doc, key
    if kind == "resources":
        key = draw(st.sampled_from(["workers_per_trial", "cpus_per_worker", "gpus_per_worker",
                                    "max_concurrent_trials", "zz_workers"]))
        value = draw(st.one_of(st.integers(-5, -1), words, st.booleans(), st.lists(st.integers(1, 2), min_size=1)))
        if key in ("cpus_per_worker", "gpus_per_worker") and isinstance(value, bool):
            value = -1  # a bool is not a count, but 0/1 CPUs would be a fair reading of it
        doc["resources"] = {key: value}
        return doc, key
    if kind == "scheduler":
        key = draw(st.sampled_from(["type", "mode", "grace_period", "reduction_factor", "metric"]))
        bad = {"type": words.filter(lambda w: w not in ("none", "asha")),
               "mode": words.filter(lambda w: w not in ("min", "max")),
               "grace_period": st.one_of(st.integers(-5, 0), words, st.booleans()),
               "reduction_factor": st.one_of(st.integers(-5, 1), words, st.booleans()),
               "metric": st.one_of(st.integers(), st.just(""), st.lists(words, min_size=1))}[key]
        doc["scheduler"] = {"type": "asha", key: draw(bad)}
        return doc, key
    if kind == "max_failures":
        doc["max_failures"] = draw(st.one_of(st.integers(-5, -1), words, st.booleans(), st.floats(0.5, 3.5)))
        return doc, "max_failures"
    if kind == "base":
        doc["base"] = draw(st.one_of(st.integers(), words.map(lambda w: w + ".yaml"), st.just({"a": 1})))
        return doc, "base"
    if kind == "grid":
        doc["grid"] = draw(st.one_of(st.just({}), st.just([]), st.integers(), words,
                                     st.just({"num_experts": []})))
        return doc, "grid"
    if kind == "grid_value":
        dotted, value, needles = draw(fit_mutations(tmp))
        if dotted == "data.data_dir":
            doc["overrides"] = {}
        doc["grid"] = {dotted: [value]}
        return doc, needles[0]
    if kind == "name":
        doc["name"] = draw(st.one_of(st.just("a b"), words.map(lambda w: w + "/x"), st.lists(words, min_size=1)))
        return doc, "name"
    doc["overrides"] = {"data.data_dir": str(tmp / "nowhere" / draw(words))}
    return doc, "data_dir"


def _write_sweep(tmp: Path, doc: dict[str, Any]) -> Path:
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@FUZZ
@given(data=st.data())
def test_bad_sweep_files_fail_before_ray_with_one_line_naming_the_key(digits_shards, tmp_path, data, monkeypatch):
    import ray

    from pipeline.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init called for a bad sweep: validation must come first")

    monkeypatch.setattr(ray, "init", no_ray)
    doc, needle = data.draw(sweep_mutations(digits_shards, tmp_path))
    path = _write_sweep(tmp_path, doc)
    with pytest.raises(Exception) as info:
        prepare_trials(load_sweep(path))
    err = info.value
    assert isinstance(err, SWEEP_CONFIG_ERRORS), f"{doc}: {type(err).__name__} would be a traceback: {err}"
    message = str(err)
    assert "\n" not in message and needle.lower() in message.lower(), (doc, message)
    # The real command (not a dry run) refuses it the same way, before any Ray call.
    assert main(["sweep", str(path)]) == 2


# --------------------------------------------------------------------------- real commands
def _condconv(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_condconv_fit_bad_configs_print_one_line_without_traceback(digits_shards, tmp_path):
    # A missing dataset was a FileNotFoundError traceback before (the in-process fuzzing covers the rest).
    cases = {"data.data_dir": (str(tmp_path / "missing"), "data_dir")}
    for dotted, (value, needle) in cases.items():
        config = _mutated(base_fit_config(digits_shards, tmp_path), dotted, value)
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(config))
        result = _condconv(["fit", "--config", str(path)], tmp_path)
        err = result.stderr.strip()
        assert result.returncode == 2, (dotted, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and len(err.splitlines()) == 1, (dotted, err)
        assert err.startswith("condconv fit: error:") and needle in err, (dotted, err)
        assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlruns").exists()  # nothing started


@pytest.mark.slow
def test_condconv_sweep_bad_file_prints_one_line_without_traceback_before_ray(digits_shards, tmp_path):
    doc = {"name": "bad", "base": str(DEMO_FIT), "overrides": {"data.data_dir": str(digits_shards)},
           "grid": {"num_experts": [0, 2], "data.batch_size": [-8]}, "storage_path": str(tmp_path / "ray")}
    result = _condconv(["sweep", str(_write_sweep(tmp_path, doc))], tmp_path)  # a real run, not --dry-run
    err = result.stderr.strip()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(err.splitlines()) == 1 and "batch_size" in err, err
    assert "Ray" not in result.stdout + result.stderr and not (tmp_path / "ray").exists()  # Ray never started
