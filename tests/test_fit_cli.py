"""`condconv fit|validate|test` end to end: real LightningCLI, real MLflow (sqlite in tmp_path), real checkpoints."""
from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

import condconv
from pipeline.checkpoint import AtomicCheckpointIO, RunCheckpoint, atomic_torch_save
from pipeline.lightning_cli import build_fit, load_config, run_lightning_cli
from tests.test_classification import TINY_SPEC, TinyDataModule

REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "mobilenet_v1-w0.25-e2-paper"
STEPS_PER_EPOCH = 4  # 64 train samples / batch 16


class RecordProgress(pl.Callback):
    """Writes the epoch and global step at train start and at fit end to a JSON file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _record(self, trainer: pl.Trainer, key: str) -> None:
        record = json.loads(Path(self.path).read_text()) if Path(self.path).exists() else {}
        record[key] = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
        Path(self.path).write_text(json.dumps(record))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, "start")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, "end")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread (the configs' num_threads: 1 sets it too); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in tmp_path (outputs/, mlruns/ land there); undo MLflow's process-wide tracking URI after."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    mlflow.set_tracking_uri(previous)  # MLFlowLogger sets it globally (and in the environment)


def _config(workdir: Path, **blocks) -> dict:
    config = {
        "seed_everything": 0,
        "num_threads": 1,
        "model": {"model": dict(TINY_SPEC), "recipe": {"lr": 0.064, "warmup_epochs": 1, "schedule": "cosine"},
                  "ema_decay": 0.9},
        "data": {"num_train": 64, "num_val": 32, "batch_size": 16},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0},
        "mlflow": {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "experiment_name": "test"},
    }
    for name, block in blocks.items():
        config[name] = {**config.get(name, {}), **block}
    return config


def _write(workdir: Path, config: dict, name: str = "fit.yaml") -> str:
    path = workdir / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _fit(argv: list[str]) -> int:
    return run_lightning_cli(argv, datamodule_class=TinyDataModule)


def _runs(workdir: Path, experiment: str = "test") -> list:
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_fit_logs_params_tags_metrics_config_and_checkpoint(workdir):
    assert _fit(["fit", "--config", _write(workdir, _config(workdir))]) == 0

    (run,) = _runs(workdir)
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    assert run.info.run_name == RUN_NAME and run.info.status == "FINISHED"
    model = condconv.create_model(condconv.ModelSpec(**TINY_SPEC))
    identity = {
        "arch": "mobilenet_v1", "width_mult": "0.25", "depth_mult": "1.0", "num_experts": "2",
        "placement": "paper", "resolution": "32", "num_classes": "10", "model_name": RUN_NAME,
        "madds": str(condconv.count_madds(model, resolution=32)), "params": str(condconv.count_params(model)),
    }
    params, tags = run.data.params, run.data.tags
    assert {k: params.get(k) for k in identity} == identity
    for key in ("arch", "width_mult", "num_experts", "placement", "madds", "params", "model_name"):
        assert tags[key] == identity[key], key
    assert params["recipe.optimizer"] == "rmsprop_tf" and params["recipe.lr"] == "0.064"
    assert params["global_batch_size"] == "16" and float(params["lr_peak"]) == pytest.approx(0.064 * 16 / 256)
    assert params["ema_decay"] == "0.9"
    assert tags["condconv.role"] == "fit"

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    assert [step for step, _ in history("train_loss")] == [STEPS_PER_EPOCH - 1, 2 * STEPS_PER_EPOCH - 1]
    for key in ("val_loss", "val_top1", "val_top5", "val_top1_ema", "val_top5_ema"):
        assert len(history(key)) == 2, key  # one per epoch
        assert all(0.0 <= v <= 1.0 for _, v in history(key)) or key == "val_loss"
    assert len(history("lr")) == 2 * STEPS_PER_EPOCH  # per optimizer step (log_every_n_steps: 1)
    assert history("data_skipped_samples")[-1][1] == 0.0

    ckpt_dir = workdir / "outputs" / "checkpoints" / RUN_NAME
    last = ckpt_dir / "last.ckpt"
    assert last.is_file()
    assert tags["checkpoint_path"] == str(last.resolve())
    assert Path(tags["best_checkpoint_path"]).is_file()
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 2 * STEPS_PER_EPOCH
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    config_text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(workdir))).read_text()
    assert yaml.safe_load(config_text)["model"]["model"]["num_experts"] == 2


def test_resume_continues_from_saved_epoch_and_step(workdir):
    config = _config(workdir)
    assert _fit(["fit", "--config", _write(workdir, config)]) == 0
    last = workdir / "outputs" / "checkpoints" / RUN_NAME / "last.ckpt"
    (first_run,) = _runs(workdir)

    progress = workdir / "progress.json"
    config["trainer"]["callbacks"] = [{"class_path": "tests.test_fit_cli.RecordProgress",
                                       "init_args": {"path": str(progress)}}]
    # Continue the same MLflow run too; its params (e.g. max_epochs) keep their first values.
    argv = ["fit", "--config", _write(workdir, config, "resume.yaml"), "--trainer.max_epochs", "3",
            "--ckpt_path", str(last), "--mlflow.run_id", first_run.info.run_id]
    assert _fit(argv) == 0

    record = json.loads(progress.read_text())
    assert record["start"] == {"epoch": 2, "global_step": 2 * STEPS_PER_EPOCH}
    assert record["end"] == {"epoch": 3, "global_step": 3 * STEPS_PER_EPOCH}
    assert torch.load(last, weights_only=True)["global_step"] == 3 * STEPS_PER_EPOCH
    (run,) = _runs(workdir)  # still one run, now with three epochs of metrics
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3
    assert run.data.params["max_epochs"] == "2"


def test_unknown_config_key_is_a_one_line_error(workdir, capsys):
    config = _config(workdir)
    config["model"]["model"]["num_expert"] = 4  # typo
    assert _fit(["fit", "--config", _write(workdir, config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("condconv fit: error:")
    assert "num_expert" in err[0]

    assert _fit(["fit", "--config", _write(workdir, _config(workdir)), "--trainer.max_epoch", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_epoch" in err[0]
    assert not (workdir / "outputs").exists() and _runs(workdir) == []


def test_invalid_value_is_a_one_line_error(workdir, capsys):
    argv = ["fit", "--config", _write(workdir, _config(workdir)), "--model.model.arch", "mobilenet_v9"]
    assert _fit(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mobilenet_v9" in err[0]


def test_num_classes_mismatch_is_a_clear_error_before_training(workdir, capsys):
    config = _config(workdir, data={"num_classes": 7})
    assert _fit(["fit", "--config", _write(workdir, config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["condconv fit: error: model.model.num_classes=10 but the data has 7 classes; "
                   "set model.model.num_classes: 7"]
    # Checked before the Trainer exists: no MLflow store or run, no checkpoint directory.
    assert not (workdir / "mlflow.db").exists() and not (workdir / "outputs").exists()


def test_print_config_and_help_exit_zero(workdir, capsys):
    assert _fit(["fit", "--config", _write(workdir, _config(workdir)), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"]["num_experts"] == 2
    assert printed["mlflow"]["experiment_name"] == "test" and printed["checkpoint"]["monitor"] == "val_top1"
    assert _fit(["fit", "--help"]) == 0


def test_validate_and_test_from_a_checkpoint(workdir):
    config_path = _write(workdir, _config(workdir))
    assert _fit(["fit", "--config", config_path]) == 0
    last = str(workdir / "outputs" / "checkpoints" / RUN_NAME / "last.ckpt")
    assert _fit(["validate", "--config", config_path, "--ckpt_path", last]) == 0
    assert _fit(["test", "--config", config_path, "--ckpt_path", last]) == 0
    runs = _runs(workdir)
    assert len(runs) == 3
    assert "val_top1" in runs[1].data.metrics and "test_top1_ema" in runs[2].data.metrics
    assert runs[2].data.params["madds"] == runs[0].data.params["madds"]


def test_build_fit_builds_the_same_parts_for_other_entry_points(workdir):
    class Marker(pl.Callback):
        pass

    config = _config(workdir, checkpoint={"save_top_k": 0})
    config["ckpt_path"] = None
    parts = build_fit(config, extra_callbacks=[Marker()], strategy="auto",
                      trainer_overrides={"max_epochs": 1}, datamodule_class=TinyDataModule)
    assert parts.run_name == RUN_NAME and parts.module.spec.num_experts == 2
    assert isinstance(parts.datamodule, TinyDataModule) and parts.datamodule.batch_size == 16
    kwargs = parts.trainer_kwargs
    assert kwargs["max_epochs"] == 1 and kwargs["strategy"] == "auto"
    assert isinstance(kwargs["callbacks"][-1], Marker)
    (ckpt,) = [c for c in kwargs["callbacks"] if isinstance(c, RunCheckpoint)]
    assert ckpt.dirpath == os.path.realpath(workdir / "outputs" / "checkpoints" / RUN_NAME)
    assert any(isinstance(p, AtomicCheckpointIO) for p in kwargs["plugins"])
    assert isinstance(kwargs["logger"], pl.loggers.MLFlowLogger)
    trainer = parts.fit()
    assert trainer.current_epoch == 1 and (workdir / "outputs" / "checkpoints" / RUN_NAME / "last.ckpt").is_file()
    (run,) = _runs(workdir)
    assert run.data.tags["model_name"] == RUN_NAME

    with pytest.raises(Exception, match="not_a_key"):
        build_fit({**config, "not_a_key": 1}, datamodule_class=TinyDataModule)


PAPER_ARCHS = ("mobilenet_v1", "mobilenet_v2", "mnasnet_a1", "resnet50", "efficientnet_b0")


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_paper_run_configs_parse_on_the_shared_base(arch, capsys):
    base = REPO / "tasks" / "classification" / "_base.yaml"
    for experts, name in ((0, "static"), (8, "condconv8")):
        run = REPO / "tasks" / "classification" / f"{arch}-{name}.yaml"
        assert run_lightning_cli(["fit", "--config", str(base), "--config", str(run), "--print_config"]) == 0
        config = yaml.safe_load(capsys.readouterr().out)
        spec = condconv.ModelSpec(**config["model"]["model"])  # validates every field
        assert (spec.arch, spec.num_experts, spec.resolution, spec.num_classes) == (arch, experts, 224, 1000)
        assert spec.placement == "paper"
        assert config["data"]["data_dir"] == "data/imagenet-wds"
        recipe = config["model"]["recipe"]
        if arch == "resnet50":
            assert (recipe["optimizer"], recipe["lr"], recipe["weight_decay"]) == ("sgd", 0.1, 1e-4)
            assert config["trainer"]["max_epochs"] == 90 and config["model"]["ema_decay"] is None
        else:
            assert (recipe["optimizer"], recipe["lr"], recipe["decay_rate"], recipe["decay_epochs"]) == (
                "rmsprop_tf", 0.016, 0.97, 2.4)
            assert recipe["weight_decay"] == 1e-5 and recipe["warmup_epochs"] == 5
            assert config["trainer"]["max_epochs"] == 350 and config["model"]["ema_decay"] == 0.9999
        assert recipe["label_smoothing"] == 0.1


def test_load_config_layers_files_like_repeated_config_flags(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  model: {arch: resnet50, num_experts: 0}\n  recipe: {lr: 0.1}\ntrainer: {max_epochs: 90}\n")
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  model: {num_experts: 8}\n")
    config = load_config(base, run, overrides={"trainer": {"devices": 2}})
    assert config["model"] == {"model": {"arch": "resnet50", "num_experts": 8}, "recipe": {"lr": 0.1}}
    assert config["trainer"] == {"max_epochs": 90, "devices": 2}


def test_atomic_save_keeps_the_old_checkpoint_when_a_write_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


@pytest.mark.slow
def test_demo_fit_learns_digits(workdir, digits_shards):
    """`condconv fit --config tasks/demo/fit.yaml` on the digits shards: well above chance (0.1)."""
    argv = ["fit", "--config", str(REPO / "tasks" / "demo" / "fit.yaml"), "--data.data_dir", str(digits_shards),
            "--mlflow.tracking_uri", f"sqlite:///{workdir}/mlflow.db", "--trainer.enable_progress_bar", "false"]
    assert run_lightning_cli(argv) == 0
    (run,) = _runs(workdir, "condconv-demo")
    assert run.data.params["model_name"] == "mobilenet_v1-w0.25-e4-paper"
    assert run.data.metrics["val_top1"] > 0.8 and run.data.metrics["val_top1_ema"] > 0.8  # chance: 0.1
    assert Path(run.data.tags["checkpoint_path"]).is_file()


@pytest.mark.slow
def test_ddp_fit_on_two_processes_logs_one_run_with_the_global_batch(workdir, digits_shards):
    """`--trainer.devices 2 --trainer.strategy ddp` (gloo on CPU): lr scaled by 2 ranks, one MLflow run."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "pipeline.cli", "fit", "--config", str(REPO / "tasks" / "demo" / "fit.yaml"),
            "--data.data_dir", str(digits_shards), "--mlflow.tracking_uri", f"sqlite:///{workdir}/mlflow.db",
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
            "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = _runs(workdir, "condconv-demo")
    params = run.data.params
    assert params["world_size"] == "2" and params["global_batch_size"] == "128"  # 64 per rank x 2
    assert float(params["lr_peak"]) == pytest.approx(0.048 * 128 / 256)
    assert params["steps_per_epoch"] == "3.0"
    assert {"train_loss", "val_top1", "val_top5", "val_top1_ema"} <= set(run.data.metrics)
    assert Path(run.data.tags["checkpoint_path"]).is_file()
