"""Checkpoints: written atomically, pruned only after the new one is complete, path recorded in MLflow.

`AtomicCheckpointIO` is the Trainer plugin that writes every checkpoint (ModelCheckpoint's and
``trainer.save_checkpoint``'s): to a temp file in the target directory, fsync, ``os.replace``,
fsync of the directory. A crash mid-write leaves the previous checkpoint intact and at most a
stray ``.*.tmp`` file (removed by the next complete save of that name), never a truncated
``.ckpt``. It loads with ``weights_only=True`` only. `RunCheckpoint` is ModelCheckpoint with this
project's defaults (best by val_top1 + last.ckpt); Lightning's ModelCheckpoint already deletes the
checkpoint a new one replaces only after the new one is saved.
"""
from __future__ import annotations

import glob
import os
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pipeline.tracking import BEST_CHECKPOINT_TAG, CHECKPOINT_TAG, set_tags

__all__ = ["AtomicCheckpointIO", "RunCheckpoint", "default_checkpoint_dir", "atomic_torch_save"]

DEFAULT_CHECKPOINT_ROOT = "outputs/checkpoints"
LAST_NAME = "last"  # last.ckpt: what `--ckpt_path last` finds


def default_checkpoint_dir(run_name: str, root: str = DEFAULT_CHECKPOINT_ROOT) -> str:
    """Where a run's checkpoints go unless configured: ``outputs/checkpoints/<run name>``."""
    return os.path.join(root, run_name)


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` to a local ``path`` so that the file is either the old one or the complete new one."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    started = time.time()
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the checkpoint the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Persist the rename itself (the directory entry), not only the file's bytes.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    _remove_stale_temp_files(path, tmp, before=started)


def _remove_stale_temp_files(path: str, current_tmp: str, before: float) -> None:
    """Delete temp files of ``path`` left by earlier saves that were killed mid-write.

    Only files older than this save's start: a concurrent writer's temp file is never touched.
    """
    directory, name = os.path.split(path)
    for stale in Path(directory).glob(f".{glob.escape(name)}.*.tmp"):
        with suppress(FileNotFoundError):
            if str(stale) != current_tmp and stale.stat().st_mtime < before:
                stale.unlink()


def _is_local(path: _PATH) -> bool:
    # fsspec's LocalFileSystem.protocol is ("file", "local"); remote filesystems name others.
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic and whose loads never unpickle code.

    Saves: temp file + fsync + ``os.replace`` (remote paths such as ``s3://`` fall back to
    Lightning's own fsspec-transaction save). Loads: always ``torch.load(weights_only=True)``,
    whatever the caller asks and whatever torch's default (False before torch 2.6): a checkpoint
    is data, and one from a shared bucket must not be able to run code. Our checkpoints hold only
    tensors and plain Python values, so nothing is lost.
    """

    def load_checkpoint(self, path: _PATH, map_location: Optional[Any] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Load ``path`` with ``weights_only=True`` (a request for ``False`` is refused)."""
        if weights_only is False:
            raise ValueError(f"refusing to load {path} with weights_only=False: checkpoints are loaded as "
                             "data only (torch.load(weights_only=True))")
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with this project's defaults, recording the checkpoint paths as MLflow tags.

    Keeps the best epoch by ``val_top1`` (mode max) and, with ``save_last``, ``last.ckpt`` after
    every epoch to resume from. Lightning 2.6's own ``save_last`` only rewrites ``last.ckpt`` when
    a top-k checkpoint is saved in the same step, so here ``last.ckpt`` comes from a companion
    callback (`last_checkpoint_callback`, which the CLI adds). ``dirpath`` left null is filled in
    by the CLI with ``outputs/checkpoints/<run name>``. At the end of fit the tags
    ``checkpoint_path`` (last) and ``best_checkpoint_path`` are set.
    """

    def __init__(
        self,
        dirpath: Optional[_PATH] = None,
        filename: Optional[str] = "{epoch:03d}-{val_top1:.4f}",
        monitor: Optional[str] = "val_top1",
        mode: str = "max",
        save_top_k: int = 1,
        save_last: bool = True,
        every_n_epochs: Optional[int] = None,
        save_weights_only: bool = False,
        verbose: bool = False,
    ) -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode,
                         save_top_k=save_top_k, save_last=False, every_n_epochs=every_n_epochs,
                         save_weights_only=save_weights_only, verbose=verbose)
        self.keep_last = save_last

    def last_checkpoint_callback(self) -> Optional[ModelCheckpoint]:
        """The companion writing ``<dirpath>/last.ckpt`` after every epoch (None without ``save_last``).

        Call after ``dirpath`` is final. It has no monitor, so it always saves, and one fixed file
        name, so each save atomically replaces the previous one.
        """
        if not self.keep_last:
            return None
        return ModelCheckpoint(dirpath=self.dirpath, filename=LAST_NAME, monitor=None, save_top_k=1,
                               enable_version_counter=False, save_weights_only=self.save_weights_only)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record where the last and best checkpoints are (absolute paths) on the MLflow run."""
        tags = {}
        last = Path(self.dirpath or ".", LAST_NAME + self.FILE_EXTENSION)
        if self.keep_last and last.is_file():
            tags[CHECKPOINT_TAG] = str(last.resolve())
        if self.best_model_path:
            tags[BEST_CHECKPOINT_TAG] = str(Path(self.best_model_path).resolve())
            tags.setdefault(CHECKPOINT_TAG, tags[BEST_CHECKPOINT_TAG])
        if tags:
            set_tags(trainer.loggers, tags)
