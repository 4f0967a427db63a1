"""Write FFCV `.beton` files (one per split) from an ImageNet-style folder or from webdataset shards.

Output (`DST/`): `train.beton`, `val.beton` and `manifest.json` (the webdataset converter's manifest,
with `format: condconv-ffcv/1`, each split's `.beton` as its only shard and the writer options under
`ffcv`). Each sample has the fields `image` (`RGBImageField`) and `label` (`IntField`, an index into
the sorted class names).

The samples and their order are the webdataset converter's: train shuffled with `seed`, val in
sorted (class, path) order; `wds-to-ffcv` keeps the order of the shards, so both routes give the
same samples in the same order. Images are decoded with the same decoder as the webdataset reader
(PIL, any mode to 8-bit RGB), so with `write_mode="raw"` the stored pixels are exactly the pixels a
webdataset reader decodes.

FFCV cannot skip a bad sample when it loads, and its writer hangs when a worker process dies, so
this module makes sure no worker can fail: every image's header is read first (unreadable files
are skipped and counted, or listed as an error with `strict`), the page size is chosen to fit the
largest image, and an image whose body then fails to decode is recorded instead of raised; the
split is then written again without it.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import multiprocessing
import os
import random
import re
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from pipeline.data.checks import require_int_at_least
from pipeline.data.ffcv_install import require_ffcv
from pipeline.data.imagenet_wds import SPLITS, scan_image_folder
from pipeline.data.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_FFCV,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    SplitInfo,
    file_sha256,
    read_manifest,
)

__all__ = [
    "BETON_FIELDS",
    "WRITE_MODES",
    "beton_name",
    "convert_imagenet_to_ffcv",
    "convert_wds_to_ffcv",
]

WRITE_MODES = ("raw", "jpg", "smart", "proportion")
# Field names in every .beton written here (the data module reads them by name).
BETON_FIELDS = ("image", "label")
# ffcv stores image height and width as uint16.
_MAX_SIDE = 65535
# ffcv's smallest (and default-ish) page; pages grow (powers of 2) to fit the largest image.
_MIN_PAGE = 1 << 23
_MAX_PAGE = 1 << 31
_MAX_LISTED = 10
_MAX_RECORDED_SKIPS = 1000


def beton_name(split: str) -> str:
    """File name of a split's `.beton` inside an FFCV data directory."""
    return f"{split}.beton"


def _listing(names: Sequence[str], limit: int = _MAX_LISTED) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in total)"


# -- sources: where one sample's encoded image is ---------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One sample: its encoded bytes live in `path` (a whole file, or `size` bytes at `offset` of a tar)."""

    path: str
    rel: str  # for messages and the manifest's skipped_files
    key: str  # the webdataset sample key (`<class>/<stem>`), the same on both routes
    label: int
    offset: int = 0
    size: int = -1

    def read(self) -> bytes:
        """The encoded image bytes."""
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def _probe(source: _Source) -> tuple[int, int, str] | str:
    """`(width, height, format)` from the image header, or the reason it cannot be read."""
    from PIL import Image

    try:
        data = source.read()
        with Image.open(io.BytesIO(data)) as img:
            return img.size[0], img.size[1], (img.format or "?").lower()
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        return f"not an image ({type(err).__name__})"


def _probe_all(sources: Sequence[_Source], workers: int) -> list[tuple[int, int, str] | str]:
    if workers > 1 and len(sources) > 256:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_probe, sources, chunksize=256))
    return [_probe(s) for s in sources]


def _stored_size(width: int, height: int, max_resolution: int | None) -> tuple[int, int]:
    """Size after ffcv's writer shrinks the longer side to `max_resolution` (its own rounding)."""
    if max_resolution is None or max(width, height) <= max_resolution:
        return width, height
    ratio = max_resolution / max(width, height)
    return int(ratio * width), int(ratio * height)


def _page_size(sizes: Sequence[tuple[int, int]]) -> int:
    """A page that holds the largest sample: raw pixels, or a JPEG of them (at most ~2x raw at q=100)."""
    largest = max((w * h * 3 for w, h in sizes), default=0)
    needed = 2 * largest + (1 << 16)
    page = max(_MIN_PAGE, 1 << math.ceil(math.log2(needed)))
    if page > _MAX_PAGE:
        raise ValueError(
            f"an image of {largest // 3} pixels does not fit an FFCV page; pass --max-resolution (e.g. 512)"
        )
    return page


# -- the indexed dataset ffcv's writer reads ---------------------------------------------------------


class _DecodedImages:
    """`dataset[i] -> (uint8 HxWx3 array, label)` for ffcv's `DatasetWriter`; never raises.

    ffcv's writer processes cannot report an exception (the parent waits forever), so a sample that
    fails to decode is flagged in a shared array and written as a 1x1 placeholder; the caller
    rewrites the split without it. Each sample seeds numpy's global generator, which ffcv's
    `proportion` mode draws from, so which images are JPEG-compressed depends only on `seed`.
    """

    def __init__(self, sources: Sequence[_Source], seed: int) -> None:
        self.sources = list(sources)
        self.seed = seed
        self.failed = multiprocessing.Array("b", max(1, len(self.sources)), lock=False)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        source = self.sources[index]
        np.random.seed(zlib.crc32(f"{self.seed}/{source.key}".encode()))
        try:
            image = np.asarray(decode_image(source.read()))
            if image.ndim != 3 or image.shape[2] != 3 or max(image.shape[:2]) > _MAX_SIDE:
                raise ImageDecodeError(f"unsupported decoded shape {image.shape}")
        except (OSError, ImageDecodeError):
            self.failed[index] = 1
            return np.zeros((1, 1, 3), np.uint8), 0
        return image, source.label

    def failures(self) -> list[int]:
        """Indices whose image did not decode."""
        return [i for i in range(len(self.sources)) if self.failed[i]]


@contextlib.contextmanager
def _quiet_writer(progress: bool) -> Iterator[None]:
    """Silence ffcv's own progress bar (it has no switch) unless `progress`."""
    import ffcv.writer

    original = ffcv.writer.tqdm
    if not progress:
        ffcv.writer.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        ffcv.writer.tqdm = original


@dataclass
class _WriterOptions:
    write_mode: str
    max_resolution: int | None
    jpeg_quality: int
    compress_probability: float
    smart_threshold: int | None

    def fields(self) -> dict[str, Any]:
        from ffcv.fields import IntField, RGBImageField

        image = RGBImageField(
            write_mode=self.write_mode,
            max_resolution=self.max_resolution,
            smart_threshold=self.smart_threshold,
            jpeg_quality=self.jpeg_quality,
            compress_probability=self.compress_probability,
        )
        return dict(zip(BETON_FIELDS, (image, IntField())))


def _write_beton(path: Path, sources: Sequence[_Source], options: _WriterOptions, page_size: int,
                 workers: int, seed: int, progress: bool) -> list[int]:
    """Write `sources` to `path` (atomically); return the indices that failed to decode (not written)."""
    from ffcv.writer import DatasetWriter

    tmp = path.with_name(path.name + ".tmp")
    dataset = _DecodedImages(sources, seed)
    writer = DatasetWriter(str(tmp), options.fields(), page_size=page_size, num_workers=workers)
    with _quiet_writer(progress):
        writer.from_indexed_dataset(dataset, chunksize=max(1, min(100, len(sources) // (4 * workers))))
    failed = dataset.failures()
    if failed:
        tmp.unlink()
        return failed
    os.replace(tmp, path)
    return []


def _stored_modes(path: Path) -> dict[str, int]:
    """Samples per storage mode (`raw` pixels or `jpg`) in a written .beton, read back with ffcv's Reader."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    reader = Reader(str(path))
    # The metadata table names its columns by field position: f0, f1, ...
    modes = reader.metadata[f"f{reader.field_names.index('image')}"]["mode"]
    names = {int(v): k for k, v in IMAGE_MODES.items()}
    values, counts = np.unique(modes, return_counts=True)
    return {names[int(v)]: int(n) for v, n in zip(values, counts)}


# -- shared driver ------------------------------------------------------------------------------------


def _check_options(write_mode: str, max_resolution: int | None, jpeg_quality: int, compress_probability: float,
                   smart_threshold: int | None, workers: int) -> _WriterOptions:
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode must be one of {list(WRITE_MODES)}, got {write_mode!r}")
    if max_resolution is not None and (not isinstance(max_resolution, int) or not 8 <= max_resolution <= _MAX_SIDE):
        raise ValueError(f"max_resolution must be an integer in [8, {_MAX_SIDE}] or None, got {max_resolution!r}")
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be an integer in [1, 100], got {jpeg_quality!r}")
    if not isinstance(compress_probability, (int, float)) or not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability must be in [0, 1], got {compress_probability!r}")
    if write_mode == "smart" and (not isinstance(smart_threshold, int) or smart_threshold < 1):
        raise ValueError(
            f"write_mode 'smart' needs smart_threshold (bytes of raw pixels above which an image is stored "
            f"as JPEG), got {smart_threshold!r}"
        )
    require_int_at_least("workers", workers, 1)
    return _WriterOptions(write_mode, max_resolution, jpeg_quality, float(compress_probability), smart_threshold)


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and not overwrite:
        existing = sorted(e.name for e in os.scandir(dst) if e.name == MANIFEST_NAME or e.name.endswith(".beton"))
        if existing:
            raise ValueError(
                f"destination {dst} already holds {_listing(existing, 3)}; pass --overwrite to replace them"
            )


def _convert(sources: dict[str, list[_Source]], classes: list[str], dst: Path, options: _WriterOptions, *,
             workers: int, strict: bool, seed: int, progress: bool, src: str, max_side: int | None,
             skipped_before: dict[str, list[str]]) -> Manifest:
    """Probe, write and describe every split of `sources` (already in their final order)."""
    require_ffcv()
    probes = {split: _probe_all(items, workers) for split, items in sources.items()}
    bad = {split: [s.rel for s, p in zip(sources[split], probes[split]) if isinstance(p, str)] for split in sources}
    if strict and any(bad.values()):
        all_bad = [*skipped_before.get("train", []), *skipped_before.get("val", []), *bad["train"], *bad["val"]]
        raise ValueError(f"{len(all_bad)} file(s) in {src} are not readable images: {_listing(all_bad)}")
    good = {split: [(s, p) for s, p in zip(sources[split], probes[split]) if not isinstance(p, str)]
            for split in sources}
    empty = [split for split in SPLITS if not good[split]]
    if empty:
        raise ValueError(f"every file of split(s) {', '.join(empty)} in {src} was unreadable; nothing to write")
    too_big = [s.rel for split in SPLITS for s, (w, h, _) in good[split]
               if max(_stored_size(w, h, options.max_resolution)) > _MAX_SIDE]
    if too_big:
        raise ValueError(f"FFCV stores at most {_MAX_SIDE} pixels a side; pass --max-resolution for: {_listing(too_big)}")
    page_size = _page_size([_stored_size(w, h, options.max_resolution) for split in SPLITS for _, (w, h, _) in good[split]])

    dst.mkdir(parents=True, exist_ok=True)
    splits: dict[str, SplitInfo] = {}
    stored_modes: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        items = [s for s, _ in good[split]]
        formats: dict[str, int] = {}
        for _, (_, _, fmt) in good[split]:
            ext = "jpg" if fmt in ("jpeg", "mpo") else fmt
            formats[ext] = formats.get(ext, 0) + 1
        skipped = [*skipped_before.get(split, []), *bad[split]]
        path = dst / beton_name(split)
        failed = _write_beton(path, items, options, page_size, workers, seed, progress)
        if failed:
            # Rare (a header that parses over a body that does not): write the split again without them.
            failed_rels = [items[i].rel for i in failed]
            if strict:
                raise ValueError(f"{len(failed)} file(s) in {src} do not decode: {_listing(failed_rels)}")
            for i in failed:
                fmt = good[split][i][1][2]
                ext = "jpg" if fmt in ("jpeg", "mpo") else fmt
                formats[ext] -= 1
            skipped += failed_rels
            drop = set(failed)
            items = [s for i, s in enumerate(items) if i not in drop]
            if not items:
                raise ValueError(f"every file of split {split} in {src} was unreadable; nothing to write")
            again = _write_beton(path, items, options, page_size, workers, seed, progress)
            if again:
                raise RuntimeError(f"images decoded once but not twice: {[items[i].rel for i in again]}")
        class_counts = [0] * len(classes)
        for s in items:
            class_counts[s.label] += 1
        stored_modes[split] = _stored_modes(path)
        splits[split] = SplitInfo(
            num_samples=len(items),
            shards=[ShardInfo(path.name, len(items), path.stat().st_size, file_sha256(path))],
            class_counts=class_counts,
            image_formats=dict(sorted((k, v) for k, v in formats.items() if v)),
            num_skipped=len(skipped),
            skipped_files=sorted(skipped)[:_MAX_RECORDED_SKIPS],
        )
    manifest = Manifest(
        classes=classes,
        splits=splits,
        format=MANIFEST_FORMAT_FFCV,
        source=src,
        max_side=max_side,
        seed=seed,
        ffcv={
            "write_mode": options.write_mode,
            "max_resolution": options.max_resolution,
            "jpeg_quality": options.jpeg_quality,
            "compress_probability": options.compress_probability,
            "smart_threshold": options.smart_threshold,
            "page_size": page_size,
            "fields": list(BETON_FIELDS),
            "stored_modes": stored_modes,
        },
    )
    manifest.save(dst / MANIFEST_NAME)
    return manifest


# -- imagenet-to-ffcv ----------------------------------------------------------------------------------


def convert_imagenet_to_ffcv(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    write_mode: str = "raw",
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    smart_threshold: int | None = None,
    workers: int = 1,
    strict: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Convert `src` (ImageNet layout) into `dst/train.beton`, `dst/val.beton` and `dst/manifest.json`.

    Args:
        src: folder with `train/<class>/*` and `val/<class>/*` (the webdataset converter's input).
        dst: output directory (created).
        write_mode: ffcv's `RGBImageField` mode: `raw` (uint8 pixels: exact, large, fastest to
            load), `jpg` (re-encoded at `jpeg_quality`), `proportion` (JPEG with probability
            `compress_probability`, raw otherwise) or `smart` (JPEG when the raw pixels exceed
            `smart_threshold` bytes).
        max_resolution: shrink images whose longer side exceeds it (ffcv's writer, INTER_AREA).
        jpeg_quality: JPEG quality for the compressed samples.
        compress_probability: share of JPEG samples in `proportion` mode (seeded per sample by `seed`).
        smart_threshold: raw-size threshold in bytes for `smart` mode.
        workers: processes decoding and writing (ffcv's writer workers; also the header check).
        strict: fail, listing them, if any file is not a readable image; by default such files
            are skipped, counted and recorded in the manifest.
        seed: seed of the train-sample order (as the webdataset converter) and of `proportion`.
        overwrite: replace `.beton` files and the manifest already in `dst`.
        progress: show ffcv's progress bar.
    """
    options = _check_options(write_mode, max_resolution, jpeg_quality, compress_probability, smart_threshold, workers)
    dst = Path(dst)
    _check_destination(dst, overwrite)
    classes, items = scan_image_folder(src)
    require_ffcv()  # after the cheap input checks, before any expensive work
    random.Random(seed).shuffle(items["train"])  # the webdataset converter's order
    sources = {split: [_Source(it.path, it.rel, it.key, it.label) for it in items[split]] for split in SPLITS}
    return _convert(sources, classes, dst, options, workers=workers, strict=strict, seed=seed, progress=progress,
                    src=str(Path(src).resolve()), max_side=None, skipped_before={})


# -- wds-to-ffcv ---------------------------------------------------------------------------------------


def _index_shard(path: str) -> tuple[list[tuple[str, int, int, str | None]], list[str]]:
    """Samples of one tar shard: `(key, image offset, image size, label text)`, and keys without an image.

    Reads tar headers and the small `.cls` members only; groups members into samples by key the way
    webdataset does (`base_plus_ext`).
    """
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None:
                continue
            if key not in samples:
                samples[key] = {}
                order.append(key)
            sample = samples[key]
            ext = ext.lower()
            if ext == "cls":
                f = tar.extractfile(member)
                sample["cls"] = f.read().decode("utf-8", "replace") if f is not None else None
            elif ext in IMAGE_EXTENSIONS and "image" not in sample:
                sample["image"] = (member.offset_data, member.size)
    out, no_image = [], []
    for key in order:
        sample = samples[key]
        if "image" not in sample:
            no_image.append(key)
            continue
        offset, size = sample["image"]
        out.append((key, offset, size, sample.get("cls")))
    return out, no_image


def convert_wds_to_ffcv(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    write_mode: str = "raw",
    max_resolution: int | None = None,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    smart_threshold: int | None = None,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Convert local webdataset shards (made by `imagenet-to-wds`, with their manifest) into `.beton` files.

    Samples keep the shards' order (so `dst` matches `imagenet-to-ffcv` of the same folder with the
    same seed); the options are those of `convert_imagenet_to_ffcv`. Samples without an image
    member, with a missing or non-integer label, or whose image does not decode are skipped and
    counted (an error with `strict`).
    """
    options = _check_options(write_mode, max_resolution, jpeg_quality, compress_probability, smart_threshold, workers)
    src_dir = Path(src)
    if "://" in str(src) or str(src).startswith("pipe:"):
        raise ValueError(f"wds-to-ffcv reads local shards; copy {src} to a local directory first")
    if not src_dir.is_dir():
        raise FileNotFoundError(f"shard directory {src_dir} does not exist")
    source_manifest = read_manifest(src_dir)
    if source_manifest.format != MANIFEST_FORMAT:
        raise ValueError(
            f"{src_dir} holds {source_manifest.format!r} data, not webdataset shards ({MANIFEST_FORMAT!r})"
        )
    dst = Path(dst)
    if dst.resolve() == src_dir.resolve():
        raise ValueError("dst must differ from src: each directory has one manifest.json")
    _check_destination(dst, overwrite)
    num_classes = source_manifest.num_classes
    shards = {split: [src_dir / s.name for s in source_manifest.split(split).shards] for split in SPLITS}
    missing = [str(p) for split in SPLITS for p in shards[split] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shards listed in {src_dir / MANIFEST_NAME} are missing: {_listing(missing)}")
    require_ffcv()

    sources: dict[str, list[_Source]] = {}
    skipped_before: dict[str, list[str]] = {}
    for split in SPLITS:
        paths = [str(p) for p in shards[split]]
        if workers > 1 and len(paths) > 1:
            with ProcessPoolExecutor(max_workers=min(workers, len(paths))) as pool:
                indexed = list(pool.map(_index_shard, paths))
        else:
            indexed = [_index_shard(p) for p in paths]
        split_sources, split_skipped = [], []
        for path, (samples, no_image) in zip(paths, indexed):
            name = os.path.basename(path)
            split_skipped += [f"{name}:{key} (no image)" for key in no_image]
            for key, offset, size, cls in samples:
                rel = f"{name}:{key}"
                label = int(cls) if cls is not None and re.fullmatch(r"\s*\d+\s*", cls) else -1
                if not 0 <= label < num_classes:
                    split_skipped.append(f"{rel} (label {cls!r})")
                    continue
                split_sources.append(_Source(path, rel, key, label, offset, size))
        sources[split], skipped_before[split] = split_sources, split_skipped
    if strict and any(skipped_before.values()):
        bad = [*skipped_before["train"], *skipped_before["val"]]
        raise ValueError(f"{len(bad)} sample(s) in {src_dir} cannot be converted: {_listing(bad)}")
    return _convert(sources, list(source_manifest.classes), dst, options, workers=workers, strict=strict,
                    seed=source_manifest.seed or 0, progress=progress, src=str(src_dir.resolve()),
                    max_side=source_manifest.max_side, skipped_before=skipped_before)
