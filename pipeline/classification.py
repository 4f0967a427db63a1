"""`ClassificationModule`: a CondConv image classifier and its training recipe as a LightningModule.

The module holds the model (built from a `condconv.ModelSpec`), the recipe (optimizer, schedule,
label smoothing, mixup), an optional EMA of the weights and the metrics; the data module holds
the data. Logged metric names (accuracies are fractions in [0, 1]):

- ``train_loss`` (epoch mean) and ``train_loss_step``, ``lr`` (per optimizer step);
- ``val_loss``, ``val_top1``, ``val_top5`` and, with EMA, ``val_loss_ema``, ``val_top1_ema``,
  ``val_top5_ema``; ``test_*`` likewise; ``data_skipped_samples`` when the data module counts
  corrupt samples it skipped; ``routing_temperature`` (per epoch) with ``routing: softmax_anneal``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import condconv
from condconv import ModelSpec
from pipeline import tracking
from pipeline.recipe import Recipe, lightning_optimizers, scaled_lr

__all__ = ["ClassificationModule", "DataMismatchError"]


class DataMismatchError(ValueError):
    """The model config does not fit the data (e.g. a different number of classes)."""


def _as_dataclass(cls: type, value: Any) -> Any:
    # Checkpoints store hyperparameters as plain dicts (loadable with torch.load(weights_only=True)).
    return cls(**value) if isinstance(value, Mapping) else value


class ClassificationModule(pl.LightningModule):
    """Image classification with a CondConv (or static) model, per the given recipe.

    Args:
        model: what network to build (``condconv.ModelSpec``; a plain dict is accepted too).
            ``num_classes`` must equal the data's number of classes (checked at setup).
        recipe: optimizer, lr schedule, label smoothing, mixup/cutmix.
        ema_decay: keep an exponential moving average of the weights with this decay
            (reference: 0.9999) and evaluate it as ``val_*_ema``; null: no EMA.
        ema_warmup: ramp the EMA decay up over the first steps (timm's warmup), so short runs
            get a useful average; the reference recipe uses a fixed decay.
        channels_last: run the model in channels-last memory format (faster convs on recent GPUs
            with bf16/fp16; leave off on CPU).
        routing_report: at the end of the fit, write the routing report of the model on the full
            val split (`pipeline.routing_report`) and log it to the MLflow run under ``routing/``
            (rank 0; CondConv models only).
    """

    def __init__(
        self,
        model: ModelSpec,
        recipe: Recipe = Recipe(),
        ema_decay: Optional[float] = None,
        ema_warmup: bool = False,
        channels_last: bool = False,
        routing_report: bool = False,
    ) -> None:
        super().__init__()
        # Via LightningCLI this stores the parsed config; called directly, the init args. Logging
        # to MLflow is done explicitly (flat names) in `setup` / `on_fit_start`.
        self.save_hyperparameters(logger=False)
        self.spec: ModelSpec = _as_dataclass(ModelSpec, model)
        self.recipe: Recipe = _as_dataclass(Recipe, recipe)
        # Plain data in checkpoints: no pickled project classes.
        self.hparams["model"] = dataclasses.asdict(self.spec)
        self.hparams["recipe"] = dataclasses.asdict(self.recipe)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay!r}; expected a number in (0, 1) or null for no EMA")
        self.channels_last = channels_last
        self.routing_report = routing_report

        self.model = condconv.create_model(self.spec)
        if channels_last:
            # Not model.to(memory_format=...): that refuses CondConv's 5-d expert weights.
            from condconv.models import channels_last_

            channels_last_(self.model)
        self.model_ema: Optional[nn.Module] = None
        if ema_decay is not None:
            from timm.utils import ModelEmaV3

            # A submodule, so it moves with the module and is saved in (and resumed from) checkpoints.
            self.model_ema = ModelEmaV3(self.model, decay=ema_decay, use_warmup=ema_warmup)
            self.model_ema.requires_grad_(False)  # not optimised; DDP must not expect its gradients
            # Lightning switches modes itself (eval for validation); timm's eval() here would only
            # trigger Lightning's "modules in eval mode at the start of training" warning.
            self.model_ema.train()

        self.mixup = None
        if self.recipe.mixup_enabled:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            # Mixup folds label smoothing into its soft targets.
            self.mixup = Mixup(mixup_alpha=self.recipe.mixup_alpha, cutmix_alpha=self.recipe.cutmix_alpha,
                               prob=self.recipe.mixup_prob, switch_prob=self.recipe.mixup_switch_prob,
                               label_smoothing=self.recipe.label_smoothing, num_classes=self.spec.num_classes)
            self.train_loss_fn: nn.Module = SoftTargetCrossEntropy()
        else:
            self.train_loss_fn = nn.CrossEntropyLoss(label_smoothing=self.recipe.label_smoothing)
        self.eval_loss_fn = nn.CrossEntropyLoss()

        stages = ["val", "test"]
        suffixes = [""] + (["_ema"] if self.model_ema is not None else [])
        self.metrics = nn.ModuleDict({
            f"{stage}{suffix}": self._accuracy_metrics() for stage in stages for suffix in suffixes
        })
        self._madds: Optional[int] = None
        self._num_params: Optional[int] = None
        self._identity_logged = False

    def _accuracy_metrics(self) -> nn.ModuleDict:
        # Fractions in [0, 1], micro-averaged over samples; torchmetrics syncs them across ranks.
        n = self.spec.num_classes
        return nn.ModuleDict({
            "top1": MulticlassAccuracy(num_classes=n, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(num_classes=n, top_k=min(5, n), average="micro"),
        })

    @property
    def run_name(self) -> str:
        """The MLflow run name for this module: the model spec's name."""
        return self.spec.name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, 3, H, W]``."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    # ---------------------------------------------------------------- setup and run facts
    def check_data(self, datamodule: Optional[pl.LightningDataModule]) -> None:
        """Raise `DataMismatchError` unless the data has ``spec.num_classes`` classes (when it says)."""
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and int(data_classes) != self.spec.num_classes:
            where = getattr(datamodule, "data_dir", None)
            raise DataMismatchError(
                f"model.model.num_classes={self.spec.num_classes} but the data"
                f"{f' at {where}' if where else ''} has {data_classes} classes; "
                f"set model.model.num_classes: {data_classes}"
            )

    def setup(self, stage: str) -> None:
        """Check the model fits the data, then log the model's identity (params and tags) to MLflow."""
        # The CLI checks this before a Trainer (or MLflow run) exists; this covers other callers.
        self.check_data(getattr(self.trainer, "datamodule", None))
        if self.trainer.is_global_zero and not self._identity_logged:
            self._madds = condconv.count_madds(self.model, resolution=self.spec.resolution)
            self._num_params = condconv.count_params(self.model)
            tracking.log_params(self.trainer.loggers, {
                **tracking.model_params(self.spec, self._madds, self._num_params),
                **tracking.recipe_params(self.recipe),
                "ema_decay": str(self.hparams.get("ema_decay")),
            })
            tracking.set_tags(self.trainer.loggers, tracking.model_tags(self.spec, self._madds, self._num_params))
            self._identity_logged = True

    def on_fit_start(self) -> None:
        """Log the facts of this training run that depend on the Trainer (batch, lr, steps)."""
        facts = {
            "global_batch_size": self.global_batch_size(),
            "lr_peak": scaled_lr(self.recipe, self.global_batch_size()),
            "steps_per_epoch": self._steps_per_epoch(),
            "max_epochs": self.trainer.max_epochs,
            "precision": self.trainer.precision,
            "world_size": self.trainer.world_size,
        }
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in ("num_train", "num_val"):
            if getattr(datamodule, name, None) is not None:
                facts[f"data_{name}"] = getattr(datamodule, name)
        tracking.log_params(self.trainer.loggers, {k: str(v) for k, v in facts.items()})

    def global_batch_size(self) -> int:
        """Images per optimizer step: batch per device x world size x gradient accumulation."""
        return self._batch_size_per_device() * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _batch_size_per_device(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None)
        size = getattr(datamodule, "batch_size", None)
        if size is None and datamodule is not None:
            size = datamodule.hparams.get("batch_size")
        if size is None:
            loader = self.trainer.train_dataloader
            size = getattr(loader, "batch_size", None)
        if not size:
            raise DataMismatchError("cannot tell the batch size per device (the lr is scaled by the global "
                                    "batch size): give the data module a `batch_size` attribute")
        return int(size)

    def _steps_per_epoch(self) -> float:
        # Optimizer steps per epoch, for the lr schedule (which is a function of the epoch).
        trainer = self.trainer
        _ = trainer.estimated_stepping_batches  # loads the train dataloader if needed
        batches = trainer.num_training_batches
        if math.isfinite(batches) and batches > 0:
            return float(math.ceil(batches / trainer.accumulate_grad_batches))
        num_train = getattr(getattr(trainer, "datamodule", None), "num_train", None)
        if not num_train:
            raise DataMismatchError("cannot tell the steps per epoch: the train dataloader has no length "
                                    "and the data module no `num_train`")
        return max(num_train / self.global_batch_size(), 1.0)

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """The recipe's optimizer at the batch-scaled lr and its per-step schedule."""
        return lightning_optimizers(self.recipe, self.model, self.global_batch_size(), self._steps_per_epoch(),
                                    self.trainer.max_epochs, self.trainer.max_steps)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimizer, then update the EMA (once per optimizer step, not per micro-batch)."""
        super().optimizer_step(*args, **kwargs)
        if self.model_ema is not None:
            self.model_ema.update(self.model, step=self.trainer.global_step)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy (label-smoothed, or soft targets under mixup) of one batch."""
        images, labels = batch
        if self.mixup is not None:
            if images.shape[0] % 2:  # timm's Mixup pairs images up: drop one from an odd batch
                images, labels = images[:-1], labels[:-1]
            images, targets = self.mixup(images, labels)
        else:
            targets = labels
        loss = self.train_loss_fn(self(images), targets)
        n = images.shape[0]
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=n)
        self.log("train_loss_step", loss, on_step=True, on_epoch=False, batch_size=n)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                 batch_size=n)
        return loss

    def on_train_epoch_start(self) -> None:
        """Set this epoch's softmax temperature on every annealed routing function (``softmax_anneal``)."""
        if self.spec.routing != "softmax_anneal":
            return
        t = condconv.annealed_temperature(self.current_epoch, self.spec.routing_temperature,
                                          self.spec.routing_anneal_epochs)
        # The EMA copy too: it is evaluated with the temperature the weights are trained at.
        for net in (self.model, self.model_ema.module if self.model_ema is not None else None):
            if net is not None:
                condconv.set_routing_temperature(net, t)
        self.log("routing_temperature", t, on_step=False, on_epoch=True, batch_size=1)

    def on_fit_end(self) -> None:
        """With ``routing_report``, write the routing report on the val split and log it to MLflow (rank 0)."""
        if self.routing_report and self.spec.is_condconv and self.trainer.is_global_zero:
            self._write_routing_report()

    def _write_routing_report(self) -> None:
        import tempfile

        from pipeline.routing_report import log_routing_report, routing_report

        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            return
        # The whole val split on this rank (ShardDataModule.dataloader); the per-rank loader otherwise.
        loader = (datamodule.dataloader("val", 0, 1) if hasattr(datamodule, "dataloader")
                  else datamodule.val_dataloader())
        with tempfile.TemporaryDirectory() as tmp:
            routing_report(self.model, loader, tmp, num_classes=self.spec.num_classes,
                           class_names=getattr(datamodule, "classes", None),
                           title=f"Routing report: {self.spec.name}",
                           notes=[f"End of fit (epoch {self.current_epoch}), val split."])
            log_routing_report(self.trainer.loggers, tmp)

    def on_train_epoch_end(self) -> None:
        """Log how many corrupt samples the data module has skipped so far (when it counts them)."""
        skipped = getattr(getattr(self.trainer, "datamodule", None), "skipped_samples", None)
        if skipped is not None:
            self.log("data_skipped_samples", float(skipped), on_step=False, on_epoch=True,
                     sync_dist=True, reduce_fx="sum")

    # ---------------------------------------------------------------- evaluation
    def _evaluate(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, labels = batch
        n = images.shape[0]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        models = [("", self.model)]
        if self.model_ema is not None:
            models.append(("_ema", self.model_ema.module))
        for suffix, net in models:
            logits = net(images)
            self.log(f"{stage}_loss{suffix}", self.eval_loss_fn(logits, labels), on_step=False, on_epoch=True,
                     sync_dist=True, prog_bar=not suffix, batch_size=n)
            for name, metric in self.metrics[f"{stage}{suffix}"].items():
                metric.update(logits, labels)
                self.log(f"{stage}_{name}{suffix}", metric, on_step=False, on_epoch=True,
                         prog_bar=name == "top1", batch_size=n)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Loss and top-1/top-5 accuracy of the model (and of its EMA)."""
        self._evaluate("val", batch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """As validation, logged as ``test_*``."""
        self._evaluate("test", batch)
