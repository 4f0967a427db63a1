"""`DetectionModule`: an SSD on a CondConv (or static) backbone, trained and COCO-evaluated as a LightningModule.

The detector is `condconv.detection.create_detector(model, detector)` (torchvision's SSD: its
matching, loss and postprocessing). Data: `pipeline.data.DetectionDataModule` batches
``(images, targets, records)``. Validation runs the detector on every val image once (across
DDP ranks), maps its boxes back to the original image size and evaluates them with pycocotools
once per epoch (`pipeline.coco_eval.CocoEvaluator`: gathered from all ranks, evaluated on rank 0,
broadcast). Logged metric names:

- ``train_loss`` (epoch mean), ``train_loss_step``, ``train_loss_bbox``, ``train_loss_cls``, ``lr``;
- ``val_map``, ``val_map_50``, ``val_map_75``, ``val_map_small``, ``val_map_medium``,
  ``val_map_large`` (fractions; -1 where the val split has no object of that size); ``test_*`` alike.

MLflow params: the backbone spec's fields (``arch``, ``width_mult``, ``num_experts`` ...), the
detector's as ``detector.<field>``, ``madds`` and ``params`` of the whole detector at its input
size (``model.resolution``), ``model_name`` = the detector's name (``ssd300-mobilenet_v1-w1.0-e8-paper``),
so `condconv frontier --metric val_map` plots mAP against detector MADDs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch

import condconv
from condconv import ModelSpec
from condconv.detection import DetectorSpec, create_detector, detector_name
from pipeline import tracking
from pipeline.classification import DataMismatchError
from pipeline.coco_eval import COCO_METRICS, CocoEvaluator
from pipeline.recipe import Recipe, lightning_optimizers, scaled_lr

__all__ = ["DetectionModule"]


def _as_dataclass(cls: type, value: Any) -> Any:
    return cls(**value) if isinstance(value, Mapping) else value


class DetectionModule(pl.LightningModule):
    """SSD object detection with a CondConv or static backbone.

    Args:
        model: the backbone (``condconv.ModelSpec``): ``resolution`` is the detector's input size
            (SSD300: 300) and ``num_classes`` the number of object categories, background not
            counted (must equal the data's; checked at setup).
        detector: the SSD around it (``condconv.detection.DetectorSpec``: head ``ssd``/``ssdlite``,
            CondConv extras/heads, postprocessing).
        recipe: optimizer and lr schedule (`pipeline.recipe.Recipe`; label smoothing and mixup
            do not apply to detection and must stay off).
    """

    def __init__(self, model: ModelSpec, detector: DetectorSpec = DetectorSpec(), recipe: Recipe = Recipe()) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.spec: ModelSpec = _as_dataclass(ModelSpec, model)
        self.detector_spec: DetectorSpec = _as_dataclass(DetectorSpec, detector)
        self.recipe: Recipe = _as_dataclass(Recipe, recipe)
        if self.recipe.mixup_enabled:
            raise ValueError("recipe.mixup_alpha/cutmix_alpha > 0; mixup and cutmix do not apply to detection")
        self.hparams["model"] = dataclasses.asdict(self.spec)
        self.hparams["detector"] = dataclasses.asdict(self.detector_spec)
        self.hparams["recipe"] = dataclasses.asdict(self.recipe)
        self.model = create_detector(self.spec, self.detector_spec)
        self.evaluator: Optional[CocoEvaluator] = None
        self._identity_logged = False

    @property
    def run_name(self) -> str:
        """The MLflow run name: the detector's name."""
        return detector_name(self.spec, self.detector_spec)

    def forward(self, images: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Detections per image (eval mode): ``boxes`` xyxy in input pixels, ``scores``, ``labels`` 1..K."""
        return self.model(list(images))

    # ---------------------------------------------------------------- setup and run facts
    def check_data(self, datamodule: Optional[pl.LightningDataModule]) -> None:
        """Raise `DataMismatchError` unless the data has ``model.num_classes`` categories (when it says)."""
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and int(data_classes) != self.spec.num_classes:
            raise DataMismatchError(
                f"model.model.num_classes={self.spec.num_classes} but the data at "
                f"{getattr(datamodule, 'data_dir', '?')} has {data_classes} categories; "
                f"set model.init_args.model.num_classes: {data_classes}")
        size = getattr(datamodule, "image_size", None)
        if size is not None and int(size) != self.spec.resolution:
            raise DataMismatchError(f"model.model.resolution={self.spec.resolution} but data.image_size={size}; "
                                    "the detector input and the data must have the same size")

    def setup(self, stage: str) -> None:
        """Check the data, make the evaluator, log the detector's identity and MADDs (rank 0)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        self.check_data(datamodule)
        categories = getattr(datamodule, "categories", None)
        if categories is None:
            categories = [{"id": i + 1, "name": str(i + 1)} for i in range(self.spec.num_classes)]
        self.evaluator = CocoEvaluator(categories)
        if self.trainer.is_global_zero and not self._identity_logged:
            madds = condconv.count_madds(self.model, resolution=self.spec.resolution)
            params = condconv.count_params(self.model)
            identity = tracking.model_params(self.spec, madds, params)
            identity["model_name"] = self.run_name
            identity.update({f"detector.{k}": tracking._param_value(v)
                             for k, v in dataclasses.asdict(self.detector_spec).items()})
            tracking.log_params(self.trainer.loggers, {**identity, **tracking.recipe_params(self.recipe),
                                                       "task": "detection"})
            tags = {k: identity[k] for k in tracking.MODEL_TAG_KEYS}
            tracking.set_tags(self.trainer.loggers, {**tags, "task": "detection"})
            self._identity_logged = True

    def on_fit_start(self) -> None:
        """Log batch size, peak lr, steps per epoch and the data sizes."""
        facts = {"global_batch_size": self.global_batch_size(), "lr_peak": scaled_lr(self.recipe, self.global_batch_size()),
                 "steps_per_epoch": self._steps_per_epoch(), "max_epochs": self.trainer.max_epochs,
                 "world_size": self.trainer.world_size}
        datamodule = getattr(self.trainer, "datamodule", None)
        for name in ("num_train", "num_val"):
            if getattr(datamodule, name, None) is not None:
                facts[f"data_{name}"] = getattr(datamodule, name)
        tracking.log_params(self.trainer.loggers, {k: str(v) for k, v in facts.items()})

    def global_batch_size(self) -> int:
        """Images per optimizer step."""
        size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
        if not size:
            raise DataMismatchError("cannot tell the batch size per device: give the data module a `batch_size`")
        return int(size) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _steps_per_epoch(self) -> float:
        trainer = self.trainer
        _ = trainer.estimated_stepping_batches
        batches = trainer.num_training_batches
        if math.isfinite(batches) and batches > 0:
            return float(math.ceil(batches / trainer.accumulate_grad_batches))
        num_train = getattr(getattr(trainer, "datamodule", None), "num_train", None) or 1
        return max(num_train / self.global_batch_size(), 1.0)

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """The recipe's optimizer at the batch-scaled lr and its per-step schedule."""
        return lightning_optimizers(self.recipe, self.model, self.global_batch_size(), self._steps_per_epoch(),
                                    self.trainer.max_epochs, self.trainer.max_steps)

    def training_step(self, batch: tuple[torch.Tensor, list, list], batch_idx: int) -> torch.Tensor:
        """SSD loss: smooth-L1 box regression + hard-negative-mined cross-entropy (torchvision's)."""
        images, targets, _ = batch
        losses = self.model(list(images), targets)
        loss = losses["bbox_regression"] + losses["classification"]
        n = images.shape[0]
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=n)
        self.log("train_loss_step", loss, on_step=True, on_epoch=False, batch_size=n)
        self.log("train_loss_bbox", losses["bbox_regression"], on_step=True, on_epoch=False, batch_size=n)
        self.log("train_loss_cls", losses["classification"], on_step=True, on_epoch=False, batch_size=n)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=n)
        return loss

    # ---------------------------------------------------------------- evaluation
    def _start_eval(self) -> None:
        if self.evaluator is not None:
            self.evaluator.reset()

    def _eval_step(self, batch: tuple[torch.Tensor, list, list]) -> None:
        images, _, records = batch
        detections = self(images)
        size = float(self.spec.resolution)
        for det, rec in zip(detections, records):
            # Back from the square input to the original image's pixels, where the ground truth lives.
            scale = det["boxes"].new_tensor([rec["width"] / size, rec["height"] / size] * 2)
            det["boxes"] = det["boxes"] * scale
        assert self.evaluator is not None
        self.evaluator.update(records, detections)

    def _end_eval(self, stage: str) -> None:
        assert self.evaluator is not None
        if self.trainer.sanity_checking:
            self.evaluator.reset()  # a couple of batches say nothing about mAP
            return
        metrics = self.evaluator.compute()  # collective: every rank calls it, every rank gets the result
        for name in COCO_METRICS:
            # Already the same on every rank: no sync needed.
            self.log(f"{stage}_{name}", metrics[name], on_step=False, on_epoch=True, prog_bar=name == "map",
                     batch_size=1)
        self.evaluator.reset()

    def on_validation_epoch_start(self) -> None:
        """Start collecting this epoch's detections."""
        self._start_eval()

    def validation_step(self, batch: tuple[torch.Tensor, list, list], batch_idx: int) -> None:
        """Detect and collect (evaluated at the end of the epoch)."""
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        """COCO mAP over the whole val split (all ranks)."""
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        """Start collecting detections."""
        self._start_eval()

    def test_step(self, batch: tuple[torch.Tensor, list, list], batch_idx: int) -> None:
        """As validation, logged as ``test_*``."""
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        """COCO mAP over the whole split (all ranks)."""
        self._end_eval("test")
