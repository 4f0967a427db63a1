"""Issue 9, item 8: the same seed and config give the same first-epoch metrics on CPU; another seed does not.

Three short fits of the demo config on the digits shards (real ShardDataModule with 2 loader
workers and random-crop augmentation, so the workers' RNGs are part of what must repeat).
"""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from pipeline.lightning_cli import build_fit, load_config

REPO = Path(__file__).resolve().parents[1]


class StepLosses(pl.Callback):
    """Every training step's loss, and the epoch metrics at the end of the fit."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.metrics: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                        if k in ("train_loss", "val_loss", "val_top1", "val_loss_ema", "val_top1_ema")}


def _first_epoch(data_dir: Path, tmp: Path, seed: int) -> StepLosses:
    config = load_config(REPO / "tasks" / "demo" / "fit.yaml", overrides={
        "seed_everything": seed,
        "data": {"data_dir": str(data_dir), "num_workers": 2, "train_augment": "standard"},
        "trainer": {"max_epochs": 1, "limit_train_batches": 4, "limit_val_batches": 2, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "num_sanity_val_steps": 0},
    })
    record = StepLosses()
    before = torch.get_num_threads()
    try:
        build_fit(config, extra_callbacks=[record]).fit()
    finally:
        torch.set_num_threads(before)  # the config's num_threads: 1 is process-wide
    assert len(record.losses) == 4 and {"train_loss", "val_loss", "val_top1"} <= set(record.metrics)
    return record


def test_same_seed_same_first_epoch_and_another_seed_differs(digits_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = _first_epoch(digits_shards, tmp_path, seed=0)
    again = _first_epoch(digits_shards, tmp_path, seed=0)
    other = _first_epoch(digits_shards, tmp_path, seed=1)
    assert again.losses == first.losses  # bit for bit, step by step
    assert again.metrics == first.metrics
    assert other.losses[0] != first.losses[0] and other.metrics["val_loss"] != first.metrics["val_loss"]
