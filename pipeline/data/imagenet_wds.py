"""Convert an ImageNet-style folder (`SRC/{train,val}/<class>/<image>`) into webdataset tar shards.

Output (`DST/`): `train-000000.tar ...`, `val-000000.tar ...` and `manifest.json`
(see `pipeline.data.manifest`). Each sample is `<key>.<ext>` (the encoded image: the original
bytes unless `max_side` shrinks it, so round trips are byte-exact) and `<key>.cls` (the integer
label as text; labels index the sorted class names). Keys are `<class>/<file stem>`.

Train samples are shuffled (seeded) before sharding: ImageNet folders are sorted by class, and a
shuffle buffer cannot mix classes that live in different shards. Val keeps the sorted order.

All input checks (layout, class sets, options, existing output) run before any image is read.
Unreadable or non-image files are skipped and counted by default (the count and their paths go
to the manifest); `strict=True` instead fails before writing, listing them.
"""
from __future__ import annotations

import io
import os
import random
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pipeline.data.checks import require_int_at_least
from pipeline.data.decode import ImageDecodeError, decode_image, sniff_format
from pipeline.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo, file_sha256

__all__ = ["SPLITS", "convert_imagenet_to_wds", "scan_image_folder"]

SPLITS = ("train", "val")
# Fixed tar member mtime: the same input gives byte-identical shards (and sha256) on every run.
_TAR_MTIME = 0
# How many bad/differing names an error message lists before "... (N in total)".
_MAX_LISTED = 10
# Manifest keeps at most this many skipped file paths (the count is always exact).
_MAX_RECORDED_SKIPS = 1000
# Re-encoding quality when `max_side` shrinks a JPEG (the usual choice for ImageNet shards).
_JPEG_QUALITY = 95


@dataclass(frozen=True)
class _Item:
    """One source image: absolute path, path relative to SRC (for messages), label, sample key."""

    path: str
    rel: str
    label: int
    key: str


def _listing(names: Sequence[str], limit: int = _MAX_LISTED) -> str:
    """`a, b, c` or `a, b, ... (N in total)` for error messages."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in total)"


def _visible(name: str) -> bool:
    # Hidden entries (.DS_Store, .ipynb_checkpoints, ._resource forks) are never data.
    return not name.startswith(".")


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and _visible(e.name))


def _files_under(class_dir: Path) -> list[str]:
    """Visible files below `class_dir` (recursively, like torchvision's ImageFolder), sorted."""
    out = []
    for root, dirs, files in os.walk(class_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        out.extend(os.path.join(root, f) for f in sorted(files) if _visible(f))
    return out


def _sample_key(class_name: str, rel_in_class: str) -> str:
    """`<class>/<path without extension>`, with dots in the file name replaced.

    webdataset splits a member name into key and extension at the first dot of its base name,
    so `a.b.JPEG` must become key `a_b`.
    """
    stem = os.path.splitext(rel_in_class)[0].replace(os.sep, "/")
    head, _, base = stem.rpartition("/")
    base = base.replace(".", "_")
    return "/".join(p for p in (class_name, head, base) if p)


def scan_image_folder(src: str | os.PathLike) -> tuple[list[str], dict[str, list[_Item]]]:
    """Validate the layout of an ImageNet-style folder and list its images (no image is opened).

    Returns the sorted class names and, per split, the items in sorted (class, path) order.
    Raises a one-line `FileNotFoundError`/`ValueError` naming what is wrong.
    """
    root = Path(src)
    expected = "expected SRC/train/<class>/<image> and SRC/val/<class>/<image>"
    if not root.exists():
        raise FileNotFoundError(f"source directory {root} does not exist; {expected}")
    if not root.is_dir():
        raise ValueError(f"source {root} is not a directory; {expected}")
    if not any(_visible(e.name) for e in os.scandir(root)):
        raise ValueError(f"source directory {root} is empty; {expected}")
    class_sets = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{split_dir} is missing; {expected}")
        classes = _class_dirs(split_dir)
        if not classes:
            raise ValueError(f"{split_dir} has no class folders; {expected}")
        class_sets[split] = classes
    if class_sets["train"] != class_sets["val"]:
        only_train = sorted(set(class_sets["train"]) - set(class_sets["val"]))
        only_val = sorted(set(class_sets["val"]) - set(class_sets["train"]))
        raise ValueError(
            "train and val have different class folders: "
            f"only in train: [{_listing(only_train)}]; only in val: [{_listing(only_val)}]"
        )
    classes = class_sets["train"]
    items: dict[str, list[_Item]] = {}
    for split in SPLITS:
        split_items: list[_Item] = []
        empty = []
        for label, name in enumerate(classes):
            class_dir = root / split / name
            files = _files_under(class_dir)
            if not files and split == "train":
                empty.append(name)
            seen: set[str] = set()
            for path in files:
                key = _sample_key(name, os.path.relpath(path, class_dir))
                unique, n = key, 1
                while unique in seen:  # `a.b.jpg` and `a_b.jpg` would collide
                    unique, n = f"{key}_{n}", n + 1
                seen.add(unique)
                split_items.append(_Item(path, os.path.relpath(path, root), label, unique))
        if empty:
            raise ValueError(f"{root / split} has class folders with no files: {_listing(empty)}")
        if not split_items:
            raise ValueError(f"{root / split} has no files in its class folders; {expected}")
        items[split] = split_items
    return classes, items


def _encode(data: bytes, ext: str, max_side: int | None) -> tuple[bytes, str]:
    """The bytes to store and their extension: the original bytes unless the image must shrink."""
    if max_side is None:
        return data, ext
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        size = img.size
    if max(size) <= max_side:
        return data, ext  # small enough: keep the original bytes (no generation loss)
    img = decode_image(data)  # normalised to RGB: the reader converts to RGB anyway
    scale = max_side / max(size)
    new_size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
    img = img.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    if ext == "jpg":
        img.save(out, "JPEG", quality=_JPEG_QUALITY)
    else:  # lossless sources stay lossless
        img.save(out, "PNG")
        ext = "png"
    return out.getvalue(), ext


@dataclass
class _ShardResult:
    """What one shard-writing task reports back to the parent process."""

    info: ShardInfo
    class_counts: dict[int, int]
    formats: dict[str, int]
    skipped: list[str]


def _write_shard(
    path: str,
    items: Sequence[_Item],
    max_side: int | None,
    on_item: Callable[[], None] | None = None,
) -> _ShardResult:
    """Write one shard (to a temporary name, renamed when complete); skip unreadable files."""
    import webdataset as wds

    class_counts: dict[int, int] = {}
    formats: dict[str, int] = {}
    skipped: list[str] = []
    tmp = path + ".tmp"
    with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=_TAR_MTIME, format="PAX_FORMAT") as sink:
        for item in items:
            try:
                with open(item.path, "rb") as f:
                    data = f.read()
                data, ext = _encode(data, sniff_format(data), max_side)
            except (OSError, ImageDecodeError):
                skipped.append(item.rel)
            else:
                sink.write({"__key__": item.key, ext: data, "cls": str(item.label)})
                class_counts[item.label] = class_counts.get(item.label, 0) + 1
                formats[ext] = formats.get(ext, 0) + 1
            if on_item is not None:
                on_item()
    os.replace(tmp, path)
    num = sum(class_counts.values())
    info = ShardInfo(os.path.basename(path), num, os.path.getsize(path), file_sha256(path))
    return _ShardResult(info, class_counts, formats, skipped)


def _find_bad_files(items: Sequence[_Item], workers: int) -> list[str]:
    """Paths (relative to SRC) of files whose header PIL cannot parse; header-only, so fast."""
    paths = [it.path for it in items]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            ok = list(pool.map(_is_image_file, paths, chunksize=256))
    else:
        ok = [_is_image_file(p) for p in paths]
    return [it.rel for it, good in zip(items, ok) if not good]


def _is_image_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            sniff_format(f.read())
        return True
    except (OSError, ImageDecodeError):
        return False


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"destination {dst} exists and is not a directory")
    if dst.is_dir() and not overwrite:
        existing = sorted(
            e.name for e in os.scandir(dst) if e.name == MANIFEST_NAME or re.fullmatch(r"(train|val)-\d+\.tar", e.name)
        )
        if existing:
            raise ValueError(
                f"destination {dst} already holds shards ({_listing(existing, 3)}); pass --overwrite to replace them"
            )


def convert_imagenet_to_wds(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    shard_size: int = 1000,
    max_side: int | None = None,
    workers: int = 1,
    strict: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Convert `src` (ImageNet layout) into webdataset shards plus `manifest.json` under `dst`.

    Args:
        src: folder with `train/<class>/*` and `val/<class>/*`; both splits need the same classes.
        dst: output directory (created).
        shard_size: samples per shard (the last shard of a split may hold fewer).
        max_side: if set, images whose longer side exceeds it are resized to it (aspect kept) and
            re-encoded (JPEG at quality 95, everything else as PNG); smaller images keep their bytes.
        workers: processes writing shards in parallel (each writes whole shards).
        strict: fail before writing if any file is not an image, listing them; by default such
            files are skipped, counted, printed and recorded in the manifest.
        seed: seed of the train-sample shuffle that mixes classes across shards.
        overwrite: replace shards already in `dst`.
        progress: show a tqdm progress bar.
    """
    for name, value, lowest in (("shard_size", shard_size, 1), ("workers", workers, 1), ("max_side", max_side, 8)):
        if value is not None:
            require_int_at_least(name, value, lowest)
    dst = Path(dst)
    _check_destination(dst, overwrite)
    classes, items = scan_image_folder(src)
    random.Random(seed).shuffle(items["train"])
    if strict:
        bad = _find_bad_files(items["train"] + items["val"], workers)
        if bad:
            raise ValueError(f"{len(bad)} file(s) in {src} are not readable images: {_listing(bad)}")

    dst.mkdir(parents=True, exist_ok=True)
    for stale in dst.glob("*.tar"):  # only reached with overwrite=True or an empty dst
        if re.fullmatch(r"(train|val)-\d+\.tar", stale.name):
            stale.unlink()
    tasks = []  # (split, shard path, items)
    for split in SPLITS:
        split_items = items[split]
        for i, start in enumerate(range(0, len(split_items), shard_size)):
            tasks.append((split, str(dst / f"{split}-{i:06d}.tar"), split_items[start : start + shard_size]))

    from tqdm.auto import tqdm

    # Import webdataset (and so torch, ~2 s) once here: forked writer processes inherit it.
    import webdataset  # noqa: F401

    total = sum(len(t[2]) for t in tasks)
    results: dict[str, _ShardResult] = {}
    with tqdm(total=total, unit="img", desc="imagenet-to-wds", disable=not progress) as bar:
        if workers == 1:
            for _, path, shard_items in tasks:
                results[path] = _write_shard(path, shard_items, max_side, on_item=lambda: bar.update(1))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
                futures = {
                    pool.submit(_write_shard, path, shard_items, max_side): (path, len(shard_items))
                    for _, path, shard_items in tasks
                }
                for future in as_completed(futures):
                    path, n = futures[future]
                    results[path] = future.result()
                    bar.update(n)

    splits = {}
    for split in SPLITS:
        shard_results = [results[path] for s, path, _ in tasks if s == split]
        class_counts = [0] * len(classes)
        formats: dict[str, int] = {}
        skipped: list[str] = []
        for r in shard_results:
            for label, n in r.class_counts.items():
                class_counts[label] += n
            for ext, n in r.formats.items():
                formats[ext] = formats.get(ext, 0) + n
            skipped.extend(r.skipped)
        splits[split] = SplitInfo(
            num_samples=sum(class_counts),
            shards=[r.info for r in shard_results],
            class_counts=class_counts,
            image_formats=dict(sorted(formats.items())),
            num_skipped=len(skipped),
            skipped_files=sorted(skipped)[:_MAX_RECORDED_SKIPS],
        )
    empty = [split for split, info in splits.items() if info.num_samples == 0]
    if empty:
        raise ValueError(
            f"every file of split(s) {', '.join(empty)} in {src} was unreadable; nothing to train or validate on"
        )
    manifest = Manifest(
        classes=classes,
        splits=splits,
        source=str(Path(src).resolve()),
        max_side=max_side,
        shard_size=shard_size,
        seed=seed,
    )
    manifest.save(dst / MANIFEST_NAME)
    return manifest
