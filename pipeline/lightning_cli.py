"""`condconv fit|validate|test`: LightningCLI with this project's defaults, and `build_fit` for the sweep.

A config has the top-level blocks ``model`` (ClassificationModule: ``model`` = the ModelSpec,
``recipe``, ``ema_decay`` ...), ``data`` (ShardDataModule; FFCVDataModule with ``format: ffcv``),
``trainer`` (lightning.Trainer), ``mlflow`` (pipeline.tracking.TrackingConfig), ``checkpoint``
(pipeline.checkpoint.RunCheckpoint) and ``seed_everything``; ``fit`` also takes ``ckpt_path`` to
resume. Conventions applied on top of what the config says (see `trainer_kwargs_with_conventions`):

- ``trainer.logger`` left null: an MLflow logger from the ``mlflow`` block, run name = spec name;
- ``checkpoint.dirpath`` left null: ``outputs/checkpoints/<run name>``;
- checkpoints are written atomically (`AtomicCheckpointIO`);
- a NaN/inf training loss stops the fit (`NonFiniteLossGuard`, unless one is configured);
- the resolved config is uploaded to the MLflow run as ``config.yaml``.

`run_lightning_cli(argv)` is what ``condconv fit ...`` runs; `build_fit(config)` builds the same
(module, data module, trainer kwargs) from a config dict, for other entry points (Ray Train).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from pipeline.checkpoint import AtomicCheckpointIO, RunCheckpoint, default_checkpoint_dir
from pipeline.config_merge import deep_merge
from pipeline.classification import ClassificationModule, DataMismatchError
from pipeline.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from pipeline.tracking import TrackerUnreachableError, TrackingConfig, make_logger

__all__ = [
    "CondConvCLI",
    "ConfigError",
    "MlflowConfigArtifact",
    "FitParts",
    "build_fit",
    "check_trainer_config",
    "load_config",
    "one_line_error",
    "run_lightning_cli",
    "trainer_kwargs_with_conventions",
]

DEFAULT_SEED = 0  # runs are reproducible unless --seed_everything says otherwise


class ConfigError(ValueError):
    """The configuration is invalid (reported as one line, exit code 2)."""


class MlflowConfigArtifact(SaveConfigCallback):
    """Upload the resolved config of a run to its MLflow run as ``config.yaml`` (rank 0).

    Replaces Lightning's default of writing ``config.yaml`` to ``trainer.log_dir``, which for an
    MLflow logger with a database store is the working directory (and clashes between runs).
    """

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Dump the config and log it as an artifact of every MLflow logger's run."""
        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not loggers:
            return
        text = self.parser.dump(self.config, skip_none=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, self.config_filename)
            path.write_text(text)
            for lg in loggers:
                lg.experiment.log_artifact(lg.run_id, str(path))


def _default_run_name(module: pl.LightningModule) -> str:
    return str(getattr(module, "run_name", None) or type(module).__name__)


def trainer_kwargs_with_conventions(
    trainer_config: Mapping[str, Any],
    module: pl.LightningModule,
    tracking: TrackingConfig,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Trainer kwargs from the ``trainer`` block plus this project's defaults.

    ``trainer.logger`` null or true -> the MLflow logger of ``tracking`` (run name = module's
    ``run_name``); ``callbacks`` (the configured ``checkpoint`` callback among them) are appended to
    ``trainer.callbacks``; a RunCheckpoint without ``dirpath`` gets ``outputs/checkpoints/<run name>``,
    its ``last.ckpt`` companion is added (both are dropped when ``trainer.enable_checkpointing`` is
    false); `AtomicCheckpointIO` is added unless a CheckpointIO plugin is configured.
    """
    kwargs = dict(trainer_config)
    run_name = tracking.run_name or _default_run_name(module)
    if kwargs.get("logger") in (None, True):
        kwargs["logger"] = make_logger(tracking, run_name)

    all_callbacks = list(kwargs.get("callbacks") or [])
    for cb in callbacks:
        if isinstance(cb, RunCheckpoint):
            if kwargs.get("enable_checkpointing") is False:
                continue
            if cb.dirpath is None:
                cb.dirpath = os.path.realpath(default_checkpoint_dir(run_name))
            last = cb.last_checkpoint_callback()
            if last is not None:
                all_callbacks.append(last)
        all_callbacks.append(cb)
    if not any(isinstance(cb, NonFiniteLossGuard) for cb in all_callbacks):
        all_callbacks.append(NonFiniteLossGuard())
    kwargs["callbacks"] = all_callbacks

    plugins = kwargs.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    kwargs["plugins"] = plugins
    return kwargs


def _registry_names(registry: Any) -> list[str]:
    return sorted(registry.available_accelerators() if hasattr(registry, "available_accelerators")
                  else registry.available_strategies())


def _valid_devices(devices: Any) -> bool:
    if devices is None or devices == "auto" or devices == -1:
        return True
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices > 0
    if isinstance(devices, (list, tuple)):
        return bool(devices) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    if isinstance(devices, str):  # "2" or "0,1" (Lightning parses these)
        parts = [p.strip() for p in devices.strip().strip(",").split(",")]
        return all(p.isdigit() for p in parts) and (len(parts) > 1 or int(parts[0]) > 0)
    return False


# Trainer arguments the dry check below must not pass on: they name hardware or objects this
# process need not have (a sweep is validated on a driver without GPUs), or have side effects.
_HARDWARE_KEYS = ("accelerator", "strategy", "devices", "num_nodes", "logger", "callbacks", "plugins",
                  "profiler", "default_root_dir", "enable_checkpointing", "precision")


def check_trainer_config(trainer_config: Mapping[str, Any]) -> None:
    """Raise `ConfigError` for a ``trainer`` block Lightning would refuse, without needing its hardware.

    Accelerator and strategy names are checked against Lightning's registries and ``devices``
    by its form; everything else (``max_epochs``, ``limit_*_batches``, ``val_check_interval`` ...)
    by building a throwaway CPU Trainer from it, which runs Lightning's own checks (~20 ms).
    """
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    accelerator = trainer_config.get("accelerator")
    accelerators = ["auto", "gpu", *_registry_names(AcceleratorRegistry)]
    if isinstance(accelerator, str) and accelerator not in accelerators:
        raise ConfigError(f"trainer.accelerator={accelerator!r}; expected one of {accelerators}")
    strategy = trainer_config.get("strategy")
    strategies = ["auto", *_registry_names(StrategyRegistry)]
    if isinstance(strategy, str) and strategy not in strategies:
        raise ConfigError(f"trainer.strategy={strategy!r}; expected one of {strategies}")
    devices = trainer_config.get("devices")
    if not _valid_devices(devices):
        raise ConfigError(f"trainer.devices={devices!r}; expected an int > 0, -1 or 'auto' (all), "
                          "or a list of device indices")
    num_nodes = trainer_config.get("num_nodes", 1)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(f"trainer.num_nodes={num_nodes!r}; expected an int >= 1")
    fixed = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
             "enable_progress_bar": False, "enable_model_summary": False}
    rest = {k: v for k, v in trainer_config.items() if k not in _HARDWARE_KEYS and k not in fixed}
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no "GPU available: ..." lines from the throwaway Trainer
    try:
        pl.Trainer(**fixed, **rest)
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise ConfigError(f"trainer: {one_line_error(err)}") from err
    finally:
        quiet.setLevel(level)


class CondConvCLI(LightningCLI):
    """LightningCLI with the ``mlflow`` and ``checkpoint`` blocks and the conventions above.

    ``build_trainer=False`` stops after computing the trainer kwargs (``self.trainer_kwargs``),
    for callers that make their own Trainer (see `build_fit`).
    """

    def __init__(self, *args: Any, build_trainer: bool = True, **kwargs: Any) -> None:
        self.build_trainer = build_trainer
        self.trainer_kwargs: dict[str, Any] = {}
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``mlflow`` (TrackingConfig) and ``checkpoint`` (RunCheckpoint) blocks and ``num_threads``."""
        parser.add_class_arguments(TrackingConfig, "mlflow")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_argument(
            "--num_threads", type=Optional[int], default=None,
            help="torch intra-op CPU threads of this process (null: torch's default). 1 avoids "
                 "oversubscribing a small CPU that is shared with data workers or other jobs.")

    def _set_seed(self) -> None:
        # LightningCLI's own seeding, minus its "Seed set to N" line: logged before the config is
        # instantiated, it would precede (and break up) the one-line error of a bad config.
        # `instantiate_classes` logs it once everything is valid.
        from lightning.fabric.utilities.seed import seed_everything

        self._seed: Optional[int] = None
        seed = self._get(self.config, "seed_everything")
        if seed is False:
            return
        self._seed = seed_everything(None if seed is True else seed, workers=True, verbose=False)
        (self.config[self.subcommand] if self.subcommand else self.config)["seed_everything"] = self._seed

    def before_instantiate_classes(self) -> None:
        """Apply ``num_threads`` before any model is built."""
        num_threads = self._get(self.config, "num_threads")
        if num_threads is not None:
            if num_threads < 1:
                raise ConfigError(f"num_threads={num_threads!r}; expected an int >= 1 or null")
            torch.set_num_threads(num_threads)

    def instantiate_classes(self) -> None:
        """Instantiate module, data module and trainer; invalid values become a `ConfigError`.

        A module with ``check_data(datamodule)`` checks the data fits it (e.g. the number of
        classes) before the Trainer, and so before any MLflow run or checkpoint directory, exists.
        """
        # jsonargparse >= 4.49 renamed instantiate_classes (deprecated) to instantiate.
        instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
        try:
            self.config_init = instantiate(self.config)
        except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, MisconfigurationException) as err:
            # A missing data_dir or a ModelCheckpoint mode typo is a config error like any other.
            raise ConfigError(str(err)) from err
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        check_data = getattr(self.model, "check_data", None)
        if callable(check_data):
            check_data(self.datamodule)
        self.trainer = self.instantiate_trainer()
        if getattr(self, "_seed", None) is not None:
            logging.getLogger("lightning.fabric.utilities.seed").info("Seed set to %d", self._seed)

    def instantiate_trainer(self, **kwargs: Any) -> Optional[pl.Trainer]:
        """Build the Trainer from the ``trainer`` block plus `trainer_kwargs_with_conventions`."""
        parser = self._parser(self.subcommand)
        callbacks = [self._get(self.config_init, key) for key in parser.callback_keys]
        tracking = self._get(self.config_init, "mlflow") or TrackingConfig()
        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        check_trainer_config(trainer_config)
        trainer_kwargs = trainer_kwargs_with_conventions(trainer_config, self.model, tracking, callbacks)
        if not trainer_kwargs.get("fast_dev_run", False):
            config = self.config.get(str(self.subcommand), self.config)
            trainer_kwargs["callbacks"].append(
                MlflowConfigArtifact(parser, config, save_to_log_dir=False, overwrite=True))
        self.trainer_kwargs = trainer_kwargs
        if not self.build_trainer:
            return None
        try:
            return self.trainer_class(**trainer_kwargs)
        except (ValueError, TypeError, MisconfigurationException) as err:
            raise ConfigError(f"trainer: {err}") from err


def uses_class_path(config: Any) -> bool:
    """True when a config's ``model`` block names its LightningModule by ``class_path`` (e.g. detection).

    Such a config gives ``model`` and ``data`` as ``{class_path: ..., init_args: ...}`` and any
    LightningModule / LightningDataModule may be named; a config without (classification) keeps
    the plain blocks of `ClassificationModule` and its data module.
    """
    model = config.get("model") if isinstance(config, Mapping) else None
    return isinstance(model, Mapping) and "class_path" in model


def _argv_configs(argv: Sequence[str]) -> list[Any]:
    """The YAML files named by ``--config`` in ``argv``, parsed (unreadable ones are left to the CLI to report)."""
    paths = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    configs = []
    for path in paths:
        try:
            configs.append(yaml.safe_load(Path(path).read_text()))
        except (OSError, yaml.YAMLError):
            continue
    return configs


def _cli_kwargs(model_class: type, datamodule_class: type, subclass_mode: bool = False) -> dict[str, Any]:
    # Errors raise (argparse.ArgumentError) instead of printing usage and exiting: the caller
    # reports them as one line. No abbreviations: `--trainer.max_epoch` must not silently mean
    # `--trainer.max_epochs`.
    parser_kwargs = {"exit_on_error": False, "allow_abbrev": False}
    if subclass_mode:  # `model`/`data` name their classes (class_path + init_args); see `uses_class_path`
        return dict(
            model_class=pl.LightningModule, datamodule_class=pl.LightningDataModule,
            subclass_mode_model=True, subclass_mode_data=True,
            **{k: v for k, v in _cli_kwargs(model_class, datamodule_class).items()
               if k not in ("model_class", "datamodule_class")},
        )
    return dict(
        model_class=model_class,
        datamodule_class=datamodule_class,
        save_config_callback=None,  # CondConvCLI adds MlflowConfigArtifact itself
        seed_everything_default=DEFAULT_SEED,
        auto_configure_optimizers=False,  # the module's recipe is the one optimizer path
        parser_kwargs={**parser_kwargs, **{sub: dict(parser_kwargs) for sub in ("fit", "validate", "test")}},
    )


def _default_datamodule_class() -> Any:
    # A function: `data.format` picks ShardDataModule (wds) or FFCVDataModule (ffcv).
    from pipeline.data.formats import classification_data

    return classification_data


def one_line_error(err: BaseException) -> str:
    """``err``'s message on one line, reduced to its cause where jsonargparse wraps it in a Union report."""
    text = str(err)
    if text.startswith("Does not validate against any of the Union subtypes"):
        # jsonargparse tries each type of an Optional[...] and lists every failure; the ones that say
        # "Expected a <class 'NoneType'>" only mean the value was not null. Keep the real cause.
        causes = [line.strip()[2:] for line in text.splitlines() if line.startswith("  - ")]
        causes = [c for c in causes if not c.startswith("Expected a <class 'NoneType'>")]
        if causes:
            text = "; ".join(causes)
    return " ".join(text.split())


def run_lightning_cli(
    argv: Sequence[str],
    *,
    model_class: type = ClassificationModule,
    datamodule_class: Optional[type] = None,
) -> int:
    """Run ``condconv fit|validate|test ARGS``; returns the exit code.

    Config errors (unknown key, bad value, model/data mismatch, an unreachable tracking server) print
    one line ``condconv fit: error: ...`` to stderr and return 2; ``--help`` and ``--print_config``
    return 0. A non-finite training loss prints one line and returns 1. Other exceptions (bugs,
    out of memory) propagate with their traceback.
    """
    argv = list(argv)
    command = argv[0] if argv else "fit"
    if datamodule_class is None:
        datamodule_class = _default_datamodule_class()
    subclass_mode = model_class is ClassificationModule and any(uses_class_path(c) for c in _argv_configs(argv))
    try:
        with warnings.catch_warnings():
            # We pass argv explicitly on purpose (sys.argv also holds `condconv fit ...`).
            warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter.*")
            CondConvCLI(args=argv, **_cli_kwargs(model_class, datamodule_class, subclass_mode))
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except (argparse.ArgumentError, ConfigError, DataMismatchError, TrackerUnreachableError) as err:
        print(f"condconv {command}: error: {one_line_error(err)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        # The run is already marked (FAILED, condconv.status=nan_loss); a traceback adds nothing.
        print(f"condconv {command}: error: {one_line_error(err)}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- build_fit
@dataclass
class FitParts:
    """Everything a fit needs: the module, the data module, Trainer kwargs and where to resume from."""

    module: pl.LightningModule
    datamodule: Optional[pl.LightningDataModule]
    trainer_kwargs: dict[str, Any]
    run_name: str
    ckpt_path: Optional[str] = None
    config: dict[str, Any] = field(default_factory=dict)

    def make_trainer(self, **overrides: Any) -> pl.Trainer:
        """A Trainer from ``trainer_kwargs`` updated with ``overrides``."""
        return pl.Trainer(**{**self.trainer_kwargs, **overrides})

    def fit(self, trainer: Optional[pl.Trainer] = None) -> pl.Trainer:
        """Run ``trainer.fit`` (a new Trainer unless given) and return the Trainer."""
        trainer = trainer or self.make_trainer()
        trainer.fit(self.module, datamodule=self.datamodule, ckpt_path=self.ckpt_path)
        return trainer


def load_config(*paths: str | os.PathLike, overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Read YAML configs (later ones override earlier ones key by key) and nested ``overrides``.

    The same layering as ``condconv fit --config A --config B`` for plain (non-class_path) blocks.
    """
    config: dict[str, Any] = {}
    for path in paths:
        config = deep_merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return deep_merge(config, overrides or {})


def build_fit(
    config: Mapping[str, Any],
    *,
    extra_callbacks: Iterable[Callback] = (),
    strategy: Any = None,
    plugins: Iterable[Any] = (),
    trainer_overrides: Optional[Mapping[str, Any]] = None,
    model_class: type = ClassificationModule,
    datamodule_class: Optional[type] = None,
) -> FitParts:
    """Build a fit from a config dict shaped like a ``condconv fit`` YAML, through the same parser.

    ``config`` has the blocks ``model``, ``data``, ``trainer``, ``mlflow``, ``checkpoint``,
    ``seed_everything`` and optionally ``ckpt_path``; it is validated like the CLI's (unknown keys
    raise ``argparse.ArgumentError``, bad values `ConfigError`). ``seed_everything`` is applied.
    ``strategy``, ``plugins`` and ``extra_callbacks`` are added to the Trainer kwargs (e.g. Ray
    Train's ``RayDDPStrategy()``, ``[RayLightningEnvironment()]``, ``[RayTrainReportCallback()]``);
    ``trainer_overrides`` replaces any other Trainer kwarg (``devices``, ``enable_progress_bar`` ...).
    The MLflow run is created lazily by the logger on rank 0 when the fit starts.
    """
    config = copy.deepcopy(dict(config))
    ckpt_path = config.pop("ckpt_path", None)
    if datamodule_class is None:
        datamodule_class = _default_datamodule_class()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter.*")
        subclass_mode = model_class is ClassificationModule and uses_class_path(config)
        cli = CondConvCLI(args=config, run=False, build_trainer=False,
                          **_cli_kwargs(model_class, datamodule_class, subclass_mode))
    kwargs = dict(cli.trainer_kwargs)
    kwargs["callbacks"] = [*kwargs["callbacks"], *extra_callbacks]
    extra_plugins = list(plugins)
    if extra_plugins:
        kept = [p for p in kwargs["plugins"]
                if not (isinstance(p, AtomicCheckpointIO) and any(isinstance(q, CheckpointIO) for q in extra_plugins))]
        kwargs["plugins"] = [*kept, *extra_plugins]
    if strategy is not None:
        kwargs["strategy"] = strategy
    kwargs.update(trainer_overrides or {})
    tracking = cli.config_init.get("mlflow") or TrackingConfig()
    return FitParts(
        module=cli.model,
        datamodule=cli.datamodule,
        trainer_kwargs=kwargs,
        run_name=tracking.run_name or _default_run_name(cli.model),
        ckpt_path=ckpt_path,
        config=yaml.safe_load(cli.parser.dump(cli.config)),
    )
