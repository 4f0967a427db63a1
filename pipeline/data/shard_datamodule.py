"""`ShardDataModule`: ImageNet-style classification batches from webdataset shards + `manifest.json`.

How batches are distributed (see docs/data.md for the full story):

* Train: every (rank, DataLoader worker) reads an endless stream of shards, reshuffled each pass
  with a seed of (seed, epoch, pass) that all ranks share. With at least as many shards as
  ranks x workers the stream of each reader is a disjoint slice of the shuffled shard list (so a
  pass reads every shard once); with fewer, every reader walks all shards from a different start.
  Samples are shuffled in a buffer, decoded, batched (full batches only) and each rank stops after
  exactly `max(1, num_train // (world_size * batch_size))` batches, split over its workers.
  Every rank thus runs the same number of steps, whatever the shard count: DDP cannot hang on
  uneven batches, and the loader has a `len` for Lightning.
* Val: every sample is read by exactly one (rank, worker). Whole shards go round-robin to ranks;
  the `n_shards % world_size` left over are read by every rank, each keeping the samples at the
  positions that fall to it. Each rank's shards are then split over its workers. Batch counts may
  differ by rank (metrics are synchronised once per epoch).
* Undecodable samples are skipped and counted in `skipped_samples` (shared with the workers), and
  so are the samples a truncated or unreadable shard should have held (per the manifest).
"""
from __future__ import annotations

import itertools
import logging
import random
import warnings
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.checks import require_int_at_least
from pipeline.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, SkipCounter, decode_image
from pipeline.data.manifest import ManifestFacts, join_location, read_manifest
from pipeline.data.ranks import rank_and_world_size
from pipeline.data.transforms import TRAIN_AUGMENTS, default_val_resize, train_transform, val_transform

__all__ = ["ShardDataModule", "train_batches_per_rank"]

log = logging.getLogger(__name__)

# Lightning warns that an IterableDataset's `__len__` "could be inaccurate" with several workers.
# Ours is exact by construction (each worker yields a fixed share), so the warning only misleads.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

# Per-process cap on "skipped sample" warnings: the count stays exact, the log stays readable.
_MAX_SKIP_WARNINGS = 20
# The endless train stream gives up when this many samples in a row (and none before) fail to decode.
_MAX_LEADING_FAILURES = 1000


def train_batches_per_rank(num_train: int, batch_size: int, world_size: int) -> int:
    """Train batches each rank runs per epoch: one pass over the data split evenly, at least 1."""
    return max(1, num_train // (world_size * batch_size))


def _worker() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _seed(*parts: Any) -> random.Random:
    # A string seed is hashed with sha512 by `random`: stable across processes and PYTHONHASHSEED.
    return random.Random("-".join(map(str, parts)))


def _log_and_continue(exn: Exception) -> bool:
    """webdataset error handler for unreadable shards: warn and go on (no sleep, unlike warn_and_continue)."""
    log.warning("skipping unreadable shard data: %r", exn)
    return True


def _collate(samples: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class _ShardStream(IterableDataset):
    """Batches from a list of shard URLs for one rank; builds its webdataset pipeline per worker.

    The pipeline is built inside `__iter__`, i.e. in the worker, where the worker id and the
    epoch (set by `_EpochDataLoader` before the workers start) are known.
    """

    def __init__(
        self,
        urls: Sequence[str],
        shard_sizes: Sequence[int],
        *,
        train: bool,
        rank: int,
        world_size: int,
        batch_size: int,
        transform: Callable[[Any], torch.Tensor],
        skip_counter: SkipCounter,
        seed: int = 0,
        shuffle_buffer: int = 0,
        num_batches: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("no shards to read")
        self.urls, self.shard_sizes = list(urls), list(shard_sizes)
        self.train, self.rank, self.world_size = train, rank, world_size
        self.batch_size, self.transform, self.skip_counter = batch_size, transform, skip_counter
        self.seed, self.shuffle_buffer, self.num_batches = seed, shuffle_buffer, num_batches
        self.num_workers = num_workers  # of the DataLoader that will run this stream (for __len__)
        self.epoch = 0
        self._sizes = dict(zip(self.urls, self.shard_sizes))
        self._partial: dict[str, int] = {}  # val: shards this rank reads only some positions of
        self._skip_warnings = 0
        self._samples_read = 0  # raw samples out of the tar files, in this worker

    def set_epoch(self, epoch: int) -> None:
        """Epoch used to seed the shard and sample shuffles (call before the workers start)."""
        self.epoch = epoch

    # -- train: endless shard stream, fixed number of batches -----------------------------------

    def _train_shards(self, worker: int, num_workers: int) -> Iterator[dict[str, str]]:
        slot, slots, n = self.rank * num_workers + worker, self.world_size * num_workers, len(self.urls)
        for pass_ in itertools.count():
            order = list(self.urls)
            _seed(self.seed, self.epoch, pass_).shuffle(order)  # the same on every rank
            if n >= slots:
                mine = order[slot::slots]  # disjoint: a pass reads every shard exactly once
            else:
                start = slot % n  # too few shards to share out: all read all, from different starts
                mine = order[start:] + order[:start]
            read_before = self._samples_read
            for url in mine:
                yield {"url": url}
            if self._samples_read == read_before:
                # Otherwise an endless stream over unreadable shards would spin forever.
                raise RuntimeError(f"no sample could be read from the shards {mine} (see the warnings above)")

    def _read_shards(self, shards: Iterator[dict[str, str]]) -> Iterator[dict]:
        """Samples of each shard in turn; what a shard should hold but did not deliver counts as skipped.

        webdataset's error handler drops the rest of a truncated or unreadable tar without a trace,
        so each shard is expanded on its own and its sample count compared with the manifest's.
        A shard cut short by the end of a train epoch (the stream is closed mid-shard) is not counted.
        """
        import webdataset as wds

        expand = wds.tarfile_to_samples(handler=_log_and_continue)
        for shard in shards:
            read = 0
            for sample in expand(iter([shard])):
                read += 1
                self._samples_read += 1
                yield sample
            self._count_missing(shard["url"], read)

    def _count_missing(self, url: str, read: int) -> None:
        size = self._sizes.get(url, 0)
        if read >= size:
            return
        j = self._partial.get(url)  # val: a shard shared by every rank, positions p with (p + j) % world == rank
        positions = range(read, size)
        missing = len(positions) if j is None else sum((p + j) % self.world_size == self.rank for p in positions)
        if missing:
            self.skip_counter.increment(missing)
            log.warning("shard %s ended after %d of its %d samples (truncated or unreadable): %d sample(s) of "
                        "this reader counted as skipped", url, read, size, missing)

    def _worker_batches(self, worker: int, num_workers: int) -> int:
        # The DataLoader interleaves workers, so the rank's total is exactly the sum of these.
        assert self.num_batches is not None
        return self.num_batches // num_workers + (worker < self.num_batches % num_workers)

    # -- val: exactly-once assignment of samples to (rank, worker) ------------------------------

    def _val_assignment(self) -> list[tuple[str, int | None]]:
        """This rank's shards: `(url, None)`: read it all; `(url, j)`: keep positions p with (p + j) % world == rank."""
        n, world = len(self.urls), self.world_size
        whole = n - n % world
        out: list[tuple[str, int | None]] = [
            (u, None) for j, u in enumerate(self.urls[:whole]) if j % world == self.rank
        ]
        out += [(u, j) for j, u in enumerate(self.urls[whole:], start=whole)]
        return out

    def _val_sample_count(self, worker: int, num_workers: int) -> int:
        count = 0
        sizes = dict(zip(self.urls, self.shard_sizes))
        for url, j in self._val_assignment()[worker::num_workers]:
            size = sizes[url]
            if j is None:
                count += size
            else:  # positions p in [0, size) with (p + j) % world == rank
                first = (self.rank - j) % self.world_size
                count += len(range(first, size, self.world_size))
        return count

    def _keep_val_positions(self, samples: Iterator[dict], partial: dict[str, int]) -> Iterator[dict]:
        url, pos = None, -1
        for sample in samples:
            if sample["__url__"] != url:
                url, pos = sample["__url__"], -1
            pos += 1
            j = partial.get(url)
            if j is None or (pos + j) % self.world_size == self.rank:
                yield sample

    # -- shared ---------------------------------------------------------------------------------

    def _decode(self, samples: Iterator[dict]) -> Iterator[tuple[torch.Tensor, int]]:
        decoded = failed = 0
        for sample in samples:
            try:
                ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
                if ext is None:
                    expected = ", ".join(IMAGE_EXTENSIONS)
                    raise ImageDecodeError(f"no image (expected one of {expected}), has {sorted(sample)}")
                label = int(sample["cls"])
                image = decode_image(sample[ext])
            except (ImageDecodeError, KeyError, ValueError) as err:
                self.skip_counter.increment()
                self._skip_warnings += 1
                if self._skip_warnings <= _MAX_SKIP_WARNINGS:
                    last = self._skip_warnings == _MAX_SKIP_WARNINGS
                    log.warning(
                        "skipping sample %s from %s: %s%s", sample.get("__key__"), sample.get("__url__"), err,
                        " (further skips are counted, not logged)" if last else "",
                    )  # fmt: skip
                failed += 1
                if self.train and not decoded and failed >= _MAX_LEADING_FAILURES:
                    raise RuntimeError(
                        f"the first {failed} train samples read were all undecodable; are these image shards?"
                    )
                continue
            decoded += 1
            yield self.transform(image), label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import webdataset as wds

        worker, num_workers = _worker()
        if self.train:
            stages: list[Any] = [
                lambda: self._train_shards(worker, num_workers),
                self._read_shards,
                wds.shuffle(
                    self.shuffle_buffer,
                    initial=self.shuffle_buffer,
                    rng=_seed(self.seed, self.epoch, "samples", self.rank, worker),
                ),
            ]
        else:
            mine = self._val_assignment()[worker::num_workers]
            if not mine:
                return iter(())
            partial = {url: j for url, j in mine if j is not None}
            self._partial = partial
            stages = [
                lambda: iter([{"url": url} for url, _ in mine]),  # (a bare list would be spliced into the stages)
                self._read_shards,
                lambda src: self._keep_val_positions(src, partial),
            ]
        stages += [self._decode, wds.batched(self.batch_size, collation_fn=_collate, partial=not self.train)]
        batches = iter(wds.DataPipeline(*stages))
        if self.train:
            return itertools.islice(batches, self._worker_batches(worker, num_workers))
        return batches

    def __len__(self) -> int:
        """Batches per epoch for this rank (val: exact unless samples are skipped, then an upper bound)."""
        if self.train:
            assert self.num_batches is not None
            return self.num_batches
        # Batches are formed per worker (each ends with its own partial batch): sum over workers.
        workers = max(1, self.num_workers)
        return sum(-(-self._val_sample_count(w, workers) // self.batch_size) for w in range(workers))


class _EpochDataLoader(DataLoader):
    """A DataLoader that passes the current epoch to its dataset whenever an epoch's iteration starts.

    Workers are not persistent, so each epoch's workers receive a dataset with the new epoch.
    """

    def __init__(self, dataset: _ShardStream, epoch_fn: Callable[[], int | None], **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._epoch_fn = epoch_fn
        self._iterations = 0

    def __iter__(self):  # noqa: D105
        epoch = self._epoch_fn()
        self.dataset.set_epoch(self._iterations if epoch is None else epoch)
        self._iterations += 1
        return super().__iter__()


class ShardDataModule(ManifestFacts, L.LightningDataModule):
    """Classification batches `(images float32 [B,3,H,W], labels int64 [B])` from webdataset shards.

    Args:
        data_dir: where `manifest.json` and the shards are: a local directory, a URL prefix
            webdataset opens (`https://host/dir`, `gs://bucket/dir`), or a template where `{}` is
            the file name, e.g. `pipe:aws s3 cp s3://bucket/imagenet/{} -` (`pipe:` runs a shell
            command: only use data_dir values you trust).
        batch_size: per-rank batch size.
        num_workers: DataLoader worker processes per rank.
        image_size: side of the square crops fed to the model.
        val_resize: shorter side before the val center crop; default `floor(image_size / 0.875)`.
        train_augment: `standard` (RandomResizedCrop + flip), `randaugment`, `autoaugment` (both on
            top of `standard`), or `none` (the val transform: resize + center crop).
        shuffle_buffer: samples held in the train shuffle buffer per worker (0: no sample shuffle).
        seed: seed of the shard and sample shuffles (epoch-dependent, identical on every run).
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
    ) -> None:
        super().__init__()
        for name, value, lowest in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("image_size", image_size, 1),
            ("shuffle_buffer", shuffle_buffer, 0),
        ):
            require_int_at_least(name, value, lowest)
        if train_augment not in TRAIN_AUGMENTS:
            raise ValueError(f"train_augment must be one of {list(TRAIN_AUGMENTS)}, got {train_augment!r}")
        if val_resize is not None and val_resize < image_size:
            raise ValueError(f"val_resize ({val_resize}) must be >= image_size ({image_size})")
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        if self.data_dir.startswith("pipe:"):
            # A config file that runs commands should say so where it is used, not only in the docs.
            log.warning("data_dir %r is a pipe: location: the manifest and every shard are read by running "
                        "this shell command; only use configs you trust", self.data_dir)
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.val_resize = default_val_resize(image_size) if val_resize is None else val_resize
        self.train_augment, self.shuffle_buffer, self.seed = train_augment, shuffle_buffer, seed
        # Read eagerly: the model checks num_classes, and DDP needs num_train, before any loader exists.
        try:
            self._manifest = read_manifest(self.data_dir)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"data_dir={self.data_dir!r}: {err}") from None
        self._require_samples(self.data_dir)
        self._skip_counter = SkipCounter()

    # -- what the data is -------------------------------------------------------------------------

    @property
    def skipped_samples(self) -> int:
        """Undecodable samples skipped so far by this process and its DataLoader workers (train + val)."""
        return self._skip_counter.value

    # -- loaders ------------------------------------------------------------------------------------

    def _rank_and_world_size(self) -> tuple[int, int]:
        return rank_and_world_size(self.trainer)

    def _current_epoch(self) -> int | None:
        return None if self.trainer is None else self.trainer.current_epoch

    def _stream(self, split: str, rank: int, world_size: int) -> _ShardStream:
        info = self._manifest.split(split)
        urls = [join_location(self.data_dir, s.name) for s in info.shards]
        sizes = [s.num_samples for s in info.shards]
        if split == "train":
            return _ShardStream(
                urls, sizes, train=True, rank=rank, world_size=world_size, batch_size=self.batch_size,
                transform=train_transform(self.image_size, self.train_augment, self.val_resize),
                skip_counter=self._skip_counter,
                seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                num_batches=train_batches_per_rank(info.num_samples, self.batch_size, world_size),
                num_workers=self.num_workers,
            )  # fmt: skip
        return _ShardStream(
            urls, sizes, train=False, rank=rank, world_size=world_size, batch_size=self.batch_size,
            transform=val_transform(self.image_size, self.val_resize), skip_counter=self._skip_counter,
            num_workers=self.num_workers,
        )  # fmt: skip

    def dataloader(self, split: str, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The loader of `split` ("train" or "val") for an explicit rank and world size.

        `train_dataloader`/`val_dataloader` call this with the Trainer's rank and world size; call it
        directly to feed a loop of your own. Without a Trainer, each `iter()` of the train loader
        counts as a new epoch for the shuffles.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        return _EpochDataLoader(
            self._stream(split, rank, world_size),
            epoch_fn=self._current_epoch,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Train batches: the same count on every rank, `max(1, num_train // (world_size * batch_size))`."""
        return self.dataloader("train", *self._rank_and_world_size())

    def val_dataloader(self) -> DataLoader:
        """Val batches: every val sample exactly once across all ranks and workers."""
        return self.dataloader("val", *self._rank_and_world_size())

    def test_dataloader(self) -> DataLoader:
        """The val split (ImageNet-style data has no labelled test split)."""
        return self.dataloader("val", *self._rank_and_world_size())
