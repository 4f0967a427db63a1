"""ClassificationModule with a real Lightning Trainer on tiny synthetic data (no logger)."""
from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import condconv
from pipeline.classification import ClassificationModule, DataMismatchError
from pipeline.recipe import Recipe

TINY_SPEC = dict(arch="mobilenet_v1", width_mult=0.25, num_experts=2, resolution=32, num_classes=10)


class TinyDataModule(pl.LightningDataModule):
    """Random images whose class shifts the mean of one channel band: learnable, instant to make.

    Exposes what ShardDataModule does: ``num_classes``, ``num_train``, ``num_val``, ``batch_size``,
    ``skipped_samples``.
    """

    def __init__(self, num_classes: int = 10, num_train: int = 64, num_val: int = 32, batch_size: int = 16,
                 image_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.num_classes, self.num_train, self.num_val = num_classes, num_train, num_val
        self.batch_size, self.image_size, self.seed = batch_size, image_size, seed
        self.skipped_samples = 0

    def _split(self, n: int, offset: int) -> TensorDataset:
        # Each class is a fixed coarse 3x4x4 colour pattern (shared by both splits), tiled to the
        # image size, under per-sample noise.
        patterns = torch.randn(self.num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(self.seed))
        gen = torch.Generator().manual_seed(self.seed + 1 + offset)
        labels = torch.arange(n) % self.num_classes
        reps = -(-self.image_size // 4)
        images = patterns[labels].repeat(1, 1, reps, reps)[..., :self.image_size, :self.image_size]
        images = images + 0.5 * torch.randn(n, 3, self.image_size, self.image_size, generator=gen)
        return TensorDataset(images, labels)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._split(self.num_train, 0), batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._split(self.num_val, 1), batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a 2-core box shared with other jobs, 2 OpenMP threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def test_forward_and_ema_is_not_optimised():
    module = ClassificationModule(condconv.ModelSpec(**TINY_SPEC), Recipe(), ema_decay=0.99)
    assert module(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    assert all(not p.requires_grad for p in module.model_ema.parameters())
    assert module.run_name == "mobilenet_v1-w0.25-e2-paper"
    # Checkpointed hyperparameters are plain data.
    assert module.hparams["model"] == dataclasses.asdict(condconv.ModelSpec(**TINY_SPEC))
    assert {k: module.hparams["model"][k] for k in TINY_SPEC} == TINY_SPEC
    assert module.hparams["recipe"] == dataclasses.asdict(Recipe())


def test_fit_scales_lr_by_global_batch_steps_schedule_and_updates_ema():
    torch.manual_seed(0)
    recipe = Recipe(lr=0.064, warmup_epochs=1, schedule="cosine")
    module = ClassificationModule(condconv.ModelSpec(**TINY_SPEC), recipe, ema_decay=0.5)
    ema_before = [p.detach().clone() for p in module.model_ema.parameters()]
    data = TinyDataModule(batch_size=16)
    trainer = _trainer(max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(module, datamodule=data)

    # 16 per device x 1 device x 2 accumulated = 32 images per optimizer step.
    assert module.global_batch_size() == 32
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.064 * 32 / 256)
    # 4 batches per epoch -> 2 optimizer steps per epoch; the scheduler steps with the optimizer.
    assert trainer.global_step == 4
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4
    # The optimizer covers the model's parameters only, each once (not the EMA copy).
    optimised = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(optimised) == len({id(p) for p in optimised}) == len(list(module.model.parameters()))
    ema_after = list(module.model_ema.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, ema_after))
    assert any(not torch.equal(a, b) for a, b in zip(ema_after, module.model.parameters()))

    metrics = trainer.callback_metrics
    for name in ("train_loss", "val_loss", "val_top1", "val_top5", "val_top1_ema", "val_top5_ema"):
        assert name in metrics, name
    for name in ("val_top1", "val_top5", "val_top1_ema"):
        assert 0.0 <= float(metrics[name]) <= 1.0  # fractions, not percent
    assert float(metrics["val_top5"]) >= float(metrics["val_top1"])
    assert float(metrics["data_skipped_samples"]) == 0.0


def test_num_classes_mismatch_fails_before_any_training_step():
    module = ClassificationModule(condconv.ModelSpec(**{**TINY_SPEC, "num_classes": 5}))
    trainer = _trainer()
    with pytest.raises(DataMismatchError, match=r"model\.model\.num_classes=5 but the data has 10 classes"):
        trainer.fit(module, datamodule=TinyDataModule(num_classes=10))
    assert trainer.global_step == 0


def test_mixup_with_an_odd_batch_and_test_metrics():
    torch.manual_seed(0)
    recipe = Recipe(mixup_alpha=0.2, cutmix_alpha=1.0, warmup_epochs=0)
    module = ClassificationModule(condconv.ModelSpec(**TINY_SPEC), recipe)
    assert module.mixup is not None
    data = TinyDataModule(num_train=30, batch_size=15)  # odd batches: one image is dropped for mixing
    trainer = _trainer(max_epochs=1)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    results = trainer.test(module, datamodule=data, verbose=False)
    assert {"test_loss", "test_top1", "test_top5"} <= set(results[0])


def test_checkpoint_loads_weights_only_and_rebuilds_the_module(tmp_path):
    spec = condconv.ModelSpec(**TINY_SPEC)
    module = ClassificationModule(spec, Recipe(lr=0.1), ema_decay=0.9)
    trainer = _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, datamodule=TinyDataModule())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # no pickled project classes inside
    assert checkpoint["hyper_parameters"]["model"]["num_experts"] == 2
    restored = ClassificationModule.load_from_checkpoint(path, weights_only=True)
    assert restored.spec == spec and restored.recipe.lr == 0.1
    for a, b in zip(restored.model_ema.parameters(), module.model_ema.parameters()):
        torch.testing.assert_close(a, b)


def test_invalid_ema_decay():
    with pytest.raises(ValueError, match="ema_decay"):
        ClassificationModule(condconv.ModelSpec(**TINY_SPEC), ema_decay=1.5)
