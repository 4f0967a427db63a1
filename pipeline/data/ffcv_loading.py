"""FFCV loading for one split on one rank: the `.beton` check, the pipelines, the rank order, the batches.

Imports ffcv at module level: import it only after `pipeline.data.ffcv_install.require_ffcv()`.

* Pipelines are FFCV's ImageNet ones. Train: `RandomResizedCropRGBImageDecoder` (scale 0.08-1,
  ratio 3/4-4/3, as torchvision's RandomResizedCrop) + `RandomHorizontalFlip`; val (and train with
  `augment="none"`): `CenterCropRGBImageDecoder` with ratio `image_size / val_resize` (the centre
  square of side `ratio x shorter side`, resized: torchvision's Resize + CenterCrop up to rounding).
  Then normalisation with the ImageNet mean/std and `ToTensor`/`ToTorchImage`: on CPU with FFCV's
  `NormalizeImage` inside the loader threads; on CUDA the uint8 batch goes `ToDevice` and is
  normalised there by torch (FFCV's own GPU normalisation would need cupy).
* Ranks: `RankOrder` gives rank `r` of `W` the positions `r, r + W, ...` of an order that all ranks
  share (train: a permutation seeded by `(seed, epoch)`, cut to `num_samples // W` per rank, so
  every rank runs `num_samples // (W x batch_size)` full batches; val: the stored order, every
  sample exactly once). This is `distributed=True` of FFCV (a `DistributedSampler`) without the
  padding, with the rank given explicitly instead of read from `torch.distributed`.
* Batches: FFCV reuses a ring of `batches_ahead + 2` output buffers, and Lightning holds one batch
  more than a plain loop (it prefetches the next batch before the step), so `FFCVBatches` copies each
  batch out of the ring before handing it on; the normalisation on CUDA makes that copy anyway.
* Loaders are cached per process (`make_loader`): FFCV compiles every loader's pipeline with numba
  (seconds), and numba's finalizer of a collected pipeline function raises (and ignores) a KeyError,
  which on Python 3.11 can leave the `ast` module's recursion counter off and break a later
  `ast.parse` ("AST constructor recursion depth mismatch"). A loader is small once no epoch runs
  (its buffers belong to the epoch), so the cache keeps each one for the life of the process.
"""
from __future__ import annotations

import os
import queue
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader
from ffcv.reader import Reader
from ffcv.traversal_order.base import TraversalOrder
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

from pipeline.data.imagenet_ffcv import BETON_FIELDS
from pipeline.data.manifest import ShardInfo
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["FFCV_AUGMENTS", "FFCVBatches", "RankOrder", "check_beton", "make_loader"]

FFCV_AUGMENTS = ("standard", "none")
# (file identity, every loader argument) -> Loader; see the module docstring.
_LOADERS: dict[tuple, Loader] = {}
_REMAKE = "re-create it with `condconv data imagenet-to-ffcv` or `condconv data wds-to-ffcv`"


def check_beton(path: str, expected: ShardInfo | None = None) -> Reader:
    """Open `path` with FFCV's `Reader` and check it is a whole `.beton` of this project; one-line `ValueError` if not.

    Checks the header, the fields (`image`, `label`), the sample count and size against the
    manifest, and that every sample's data lies inside the file, so a truncated or foreign file is
    refused here instead of crashing (or silently misreading) inside FFCV's compiled loader. The
    image bytes themselves are not hashed (use `Manifest.verify` for that).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; {_REMAKE}")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file; expected an FFCV .beton")
    size = os.path.getsize(path)
    if expected is not None and size != expected.size:
        raise ValueError(
            f"{path} has {size} bytes but its manifest says {expected.size}: the file is truncated or "
            f"replaced; {_REMAKE}"
        )
    try:
        reader = Reader(path)
    except Exception as err:  # numpy errors, AssertionError (version), KeyError (field type) ...
        raise ValueError(f"{path} is not an FFCV .beton ({type(err).__name__}: {' '.join(str(err).split())}); "
                         f"{_REMAKE}") from None
    if tuple(reader.field_names) != BETON_FIELDS:
        raise ValueError(f"{path} has fields {reader.field_names}, expected {list(BETON_FIELDS)}; {_REMAKE}")
    if expected is not None and int(reader.num_samples) != expected.num_samples:
        raise ValueError(
            f"{path} holds {int(reader.num_samples)} samples but its manifest says {expected.num_samples}; {_REMAKE}"
        )
    table = reader.alloc_table
    image = reader.metadata["f0"]
    if (len(reader.metadata) != int(reader.num_samples)
            or len(table) == 0
            or np.any(table["ptr"] + table["size"] > size)
            or not np.all(np.isin(image["data_ptr"], table["ptr"]))):  # fmt: skip
        raise ValueError(f"{path} is damaged (its sample table points outside the file); {_REMAKE}")
    return reader


class RankOrder(TraversalOrder):
    """FFCV traversal order for rank `rank` of `world_size`: equal train shares, exactly-once val.

    FFCV builds a custom order by calling the instance with the loader (`order(loader)`), so the
    constructor takes only the rank parameters and `__call__` binds the loader.
    """

    def __init__(self, rank: int, world_size: int, shuffle: bool, seed: int) -> None:  # noqa: D107
        # TraversalOrder.__init__ needs the loader, which FFCV passes later to __call__.
        self.rank, self.world_size, self.shuffle, self.seed = rank, world_size, shuffle, seed
        self.indices = np.empty(0, dtype=np.int64)

    def __call__(self, loader: Loader) -> "RankOrder":
        """Bind to `loader` (its `indices`); FFCV calls this once, in `Loader.__init__`."""
        self.loader = loader
        self.indices = np.asarray(loader.indices)
        self.distributed = self.world_size > 1
        self.sampler = None
        return self

    def sample_order(self, epoch: int) -> Sequence[int]:
        """This rank's sample indices for `epoch`."""
        indices = self.indices
        if not self.shuffle:
            return indices[self.rank :: self.world_size]
        # The same permutation on every rank (seeded by seed and epoch), then disjoint equal shares.
        indices = np.random.default_rng([self.seed, epoch]).permutation(indices)
        per_rank = len(indices) // self.world_size
        return indices[self.rank :: self.world_size][:per_rank]


def _pipelines(train: bool, augment: str, image_size: int, val_resize: int,
               device: torch.device) -> dict[str, list]:
    size = (image_size, image_size)
    if train and augment == "standard":
        image: list = [RandomResizedCropRGBImageDecoder(size), RandomHorizontalFlip()]
    else:
        image = [CenterCropRGBImageDecoder(size, ratio=image_size / val_resize)]
    label: list = [IntDecoder(), ToTensor(), Squeeze(1)]
    if device.type == "cpu":
        mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
        image += [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
    else:
        image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
        label += [ToDevice(device, non_blocking=True)]
    return {"image": image, "label": label}


def make_loader(
    path: str,
    *,
    train: bool,
    batch_size: int,
    num_workers: int,
    image_size: int,
    val_resize: int,
    augment: str = "standard",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    os_cache: bool = True,
    batches_ahead: int = 3,
    device: torch.device | str = "cpu",
) -> Loader:
    """An FFCV `Loader` over the `.beton` at `path` for one split on one rank (see the module docstring).

    Train drops the last partial batch (equal batch counts on every rank); val keeps it.
    `num_workers` is FFCV's number of threads (at least 1). The same arguments (and file) give the
    same, already compiled, loader for the rest of the process.
    """
    if augment not in FFCV_AUGMENTS:
        raise ValueError(f"train_augment must be one of {list(FFCV_AUGMENTS)} with format 'ffcv', got {augment!r}")
    device = torch.device(device)
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, train, batch_size, max(1, num_workers),
           image_size, val_resize, augment, rank, world_size, seed, os_cache, batches_ahead, str(device))
    if key not in _LOADERS:
        _LOADERS[key] = _new_loader(path, train, batch_size, num_workers, image_size, val_resize, augment, rank,
                                    world_size, seed, os_cache, batches_ahead, device)
    return _LOADERS[key]


def _new_loader(path: str, train: bool, batch_size: int, num_workers: int, image_size: int, val_resize: int,
                augment: str, rank: int, world_size: int, seed: int, os_cache: bool, batches_ahead: int,
                device: torch.device) -> Loader:
    return Loader(
        path,
        batch_size=batch_size,
        num_workers=max(1, num_workers),
        os_cache=os_cache,
        order=RankOrder(rank, world_size, shuffle=train, seed=seed),
        seed=seed,
        pipelines=_pipelines(train, augment, image_size, val_resize, device),
        drop_last=train,
        batches_ahead=batches_ahead,
    )


class FFCVBatches:
    """Iterable of `(images float32 [B,3,H,W], labels int64 [B])` over an FFCV `Loader`, with a `len`.

    Each `iter()` starts the epoch `epoch_fn()` returns (the Trainer's current epoch, so a resumed
    run continues the same shuffle sequence); without one, the n-th `iter()` is epoch n.
    Batches are copied out of FFCV's reused buffers (see the module docstring); on CUDA they are
    normalised there. Images are channels-last in memory, as FFCV makes them.
    """

    def __init__(self, loader: Loader, device: torch.device | str = "cpu",
                 epoch_fn: Callable[[], int | None] | None = None) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self._epoch_fn = epoch_fn
        self._iterations = 0
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._epoch_fn() if self._epoch_fn is not None else None
        # Loaders are shared (cached), so the epoch is set here rather than left to the loader's counter.
        self.loader.next_epoch = self._iterations if epoch is None else epoch
        self._iterations += 1
        epoch_iterator = iter(self.loader)
        finished = False
        try:
            for images, labels in _batches(epoch_iterator):
                if self.device.type == "cpu":
                    images = images.clone()  # already normalised by FFCV; keeps its channels-last layout
                else:
                    images = images.float().sub_(self._mean).div_(self._std)
                yield images, labels.clone()
            finished = True
        finally:
            if not finished:  # left early (limit_*_batches, an exception): stop FFCV's producer thread
                epoch_iterator.close()


def _batches(epoch_iterator) -> Iterator[tuple]:
    """FFCV's `EpochIterator.__next__` (ffcv 1.0.2), except that a dead producer thread raises instead of hanging.

    FFCV's own `__next__` blocks on its queue forever when the thread that fills it dies (an
    exception in a pipeline stage, or in numba's compilation, which happens on that thread).
    """
    while True:
        try:
            item = epoch_iterator.output_queue.get(timeout=1.0)
        except queue.Empty:
            if not epoch_iterator.is_alive() and epoch_iterator.output_queue.empty():
                raise RuntimeError(
                    "FFCV's loader thread stopped before the end of the epoch (its exception is printed above)"
                ) from None
            continue
        if item is None:
            epoch_iterator.close()
            return
        slot, result = item
        if getattr(epoch_iterator, "current_stream", None) is not None:  # CUDA: wait for this slot's copies
            epoch_iterator.current_stream.wait_stream(epoch_iterator.cuda_streams[slot])
        yield result
