"""`FFCVDataModule`: ImageNet-style classification batches from FFCV `.beton` files + `manifest.json`.

The FFCV counterpart of `ShardDataModule`, with the same arguments and the same batches
(`float32 [B,3,H,W]` normalised with the ImageNet mean/std, `int64 [B]`), so a config switches
between them with `data.format` alone (see `pipeline.data.formats`). Differences, all FFCV's:

* the train shuffle is a full permutation per epoch (no `shuffle_buffer`, which is accepted and unused);
* `train_augment` is `standard` (FFCV's random-resized-crop decoder + flip) or `none` (the val
  center crop); RandAugment/AutoAugment have no FFCV implementation and are refused;
* `num_workers` are FFCV's decoding threads (0 means 1), not DataLoader processes;
* no sample is skipped at load time: the converter already left out unreadable images.

Distributed training: every rank runs `num_train // (world_size x batch_size)` full train batches,
and every val sample is read exactly once across ranks (see `pipeline.data.ffcv_loading`).
"""
from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch

from pipeline.data.checks import require_int_at_least
from pipeline.data.ffcv_install import require_ffcv
from pipeline.data.manifest import MANIFEST_FORMAT_FFCV, MANIFEST_NAME, Manifest, ManifestFacts, read_manifest
from pipeline.data.ranks import rank_and_world_size
from pipeline.data.transforms import TRAIN_AUGMENTS, default_val_resize

__all__ = ["FFCVDataModule"]

_FFCV_AUGMENTS = ("standard", "none")


class FFCVDataModule(ManifestFacts, L.LightningDataModule):
    """Classification batches `(images float32 [B,3,H,W], labels int64 [B])` from FFCV `.beton` files.

    Args:
        data_dir: local directory with `manifest.json`, `train.beton` and `val.beton`
            (`condconv data imagenet-to-ffcv` or `wds-to-ffcv`).
        batch_size: per-rank batch size.
        num_workers: FFCV loader threads per rank (0 counts as 1).
        image_size: side of the square crops fed to the model.
        val_resize: shorter side the val center crop is taken from; default `floor(image_size / 0.875)`.
        train_augment: `standard` (random resized crop + flip) or `none` (the val center crop).
        shuffle_buffer: accepted so a webdataset config runs unchanged; FFCV shuffles all samples.
        seed: seed of the per-epoch train permutation (the same on every rank and run).
        os_cache: read through the OS page cache (FFCV's default; shared by the ranks of a node);
            False uses FFCV's process cache, for data larger than memory.
        batches_ahead: batches FFCV prepares in advance.
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 64,
        num_workers: int = 2,
        image_size: int = 224,
        val_resize: int | None = None,
        train_augment: str = "standard",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        os_cache: bool = True,
        batches_ahead: int = 3,
    ) -> None:
        super().__init__()
        for name, value, lowest in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("image_size", image_size, 1),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("batches_ahead", batches_ahead, 1),
        ):
            require_int_at_least(name, value, lowest)
        if train_augment not in _FFCV_AUGMENTS:
            hint = " (no FFCV implementation; use format 'wds' for it)" if train_augment in TRAIN_AUGMENTS else ""
            raise ValueError(
                f"train_augment must be one of {list(_FFCV_AUGMENTS)} with format 'ffcv', got {train_augment!r}{hint}"
            )
        if val_resize is not None and val_resize < image_size:
            raise ValueError(f"val_resize ({val_resize}) must be >= image_size ({image_size})")
        require_ffcv()
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.val_resize = default_val_resize(image_size) if val_resize is None else val_resize
        self.train_augment, self.shuffle_buffer, self.seed = train_augment, shuffle_buffer, seed
        self.os_cache, self.batches_ahead = os_cache, batches_ahead
        self._manifest = _read_ffcv_manifest(self.data_dir)
        self._require_samples(self.data_dir)
        # Opened eagerly, like the manifest: a damaged file fails here, before any Trainer or MLflow run.
        from pipeline.data.ffcv_loading import check_beton

        for split in ("train", "val"):
            check_beton(self._beton(split), self._manifest.split(split).shards[0])
        # FFCV compiles each loader's pipeline with numba (seconds): build each one once.
        self._loaders: dict[tuple[str, int, int, str], Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # FFCV loaders hold threads and memory maps: a copy (spawned process, deepcopy) builds its own.
        return {**self.__dict__, "_loaders": {}}

    # -- what the data is -------------------------------------------------------------------------

    @property
    def skipped_samples(self) -> int:
        """Always 0: FFCV cannot skip at load time; the converter's skips are in `manifest.splits[...].num_skipped`."""
        return 0

    # -- loaders ------------------------------------------------------------------------------------

    def _beton(self, split: str) -> str:
        return os.path.join(self.data_dir, self._manifest.split(split).shards[0].name)

    def _rank_and_world_size(self) -> tuple[int, int]:
        return rank_and_world_size(self.trainer)

    def _device(self) -> torch.device:
        """Where batches are made: the Trainer's device (FFCV copies them there itself), else CPU."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def _current_epoch(self) -> int | None:
        return None if self.trainer is None else self.trainer.current_epoch

    def dataloader(self, split: str, rank: int = 0, world_size: int = 1, device: torch.device | str | None = None):
        """The batches of `split` ("train" or "val") for an explicit rank and world size (an `FFCVBatches`).

        `train_dataloader`/`val_dataloader` call this with the Trainer's rank, world size and
        device. Loaders are built once per (split, rank, world size, device) and then reused (FFCV
        compiles each one). Without a Trainer, each `iter()` of the train loader is the next epoch.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        train = split == "train"
        if train and self.num_train // (world_size * self.batch_size) == 0:
            raise ValueError(
                f"{self.num_train} train samples make no full batch of {self.batch_size} on each of "
                f"{world_size} rank(s); lower batch_size"
            )
        from pipeline.data.ffcv_loading import FFCVBatches, make_loader

        device = self._device() if device is None else torch.device(device)
        key = (split, rank, world_size, str(device))
        if key in self._loaders:
            return self._loaders[key]
        loader = make_loader(
            self._beton(split), train=train, batch_size=self.batch_size, num_workers=self.num_workers,
            image_size=self.image_size, val_resize=self.val_resize, augment=self.train_augment if train else "none",
            rank=rank, world_size=world_size, seed=self.seed, os_cache=self.os_cache,
            batches_ahead=self.batches_ahead, device=device,
        )  # fmt: skip
        self._loaders[key] = FFCVBatches(loader, device, epoch_fn=self._current_epoch if train else None)
        return self._loaders[key]

    def train_dataloader(self) -> Any:
        """Train batches: `num_train // (world_size * batch_size)` full batches on every rank."""
        return self.dataloader("train", *self._rank_and_world_size())

    def val_dataloader(self) -> Any:
        """Val batches: every val sample exactly once across all ranks."""
        return self.dataloader("val", *self._rank_and_world_size())

    def test_dataloader(self) -> Any:
        """The val split (ImageNet-style data has no labelled test split)."""
        return self.dataloader("val", *self._rank_and_world_size())


def _read_ffcv_manifest(data_dir: str) -> Manifest:
    """The manifest of an FFCV directory; one-line errors for a missing one or a webdataset one."""
    if "://" in data_dir or data_dir.startswith("pipe:"):
        raise ValueError(f"data_dir={data_dir!r}: format 'ffcv' reads local .beton files; copy them to a local disk")
    if os.path.isfile(data_dir):
        raise ValueError(
            f"data_dir={data_dir!r} is a file; give the directory holding {MANIFEST_NAME} and the .beton files"
        )
    if not os.path.isfile(os.path.join(data_dir, MANIFEST_NAME)):
        where = "" if os.path.isdir(data_dir) else " (the directory does not exist)"
        raise FileNotFoundError(
            f"data_dir={data_dir!r}: no {MANIFEST_NAME}{where}; create .beton files with "
            f"`condconv data imagenet-to-ffcv SRC {data_dir}` or `condconv data wds-to-ffcv SHARDS {data_dir}`"
        )
    manifest = read_manifest(data_dir)
    if manifest.format != MANIFEST_FORMAT_FFCV:
        raise ValueError(
            f"data_dir={data_dir!r} holds webdataset shards ({manifest.format}), not .beton files: set "
            f"data.format: wds, or convert them with `condconv data wds-to-ffcv {data_dir} DST`"
        )
    return manifest
