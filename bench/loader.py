"""Training-loader throughput: webdataset (`ShardDataModule`) and FFCV (`FFCVDataModule`) against the raw JPEG
decode rate of the same files, side by side in one run (interleaved repetitions), with workers = cores.

    python bench/loader.py                 # photo-sized JPEGs at 224 and the digits at 32
    python bench/loader.py --quick         # smoke run (64 small photos, one repetition, no digits)

Data, made here (no download): `--images` synthetic photo-like JPEGs (500x375, quality 90: smooth
random fields with edges and sensor-like noise, ~ImageNet's typical size and file size) and the demo's
scikit-learn digits written as 32x32 JPEGs, each as an ImageNet-style folder converted by our own
converters to webdataset shards and to FFCV `.beton` files (`jpg` mode at the same quality, so FFCV
decodes JPEGs of the same size and quality, and `raw` mode, which skips decoding).

Rows, per image size (one repetition = one epoch of every row, in a random order):
  raw decode (PIL)   decode_image() of the original bytes (what the wds reader runs) in `workers` processes
  raw decode (cv2)   cv2.imdecode of the same bytes (libjpeg-turbo, as FFCV's decoder), same processes
  wds                ShardDataModule train loader: PIL decode + RandomResizedCrop + flip + normalise,
                     `workers` DataLoader processes
  ffcv jpg / raw     FFCVDataModule train loader: FFCV's RandomResizedCrop decoder + flip + normalise,
                     `workers` threads
A rate is images per second of wall time over a whole epoch (worker start-up included, as in
training); "/ raw decode" is the median over repetitions of the within-repetition ratio to the PIL
decode rate. The machine is shared: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import interleaved  # noqa: E402

__all__ = ["main", "make_photo_folder"]

_BYTES: list[bytes] = []  # the files of the decode rows; set before the pool forks, read by its workers


def make_photo_folder(root: Path, n_train: int, size: tuple[int, int], classes: int = 10, seed: int = 0) -> None:
    """An ImageNet-style folder of synthetic photo-like JPEGs (quality 90): `n_train` train and `classes` val images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for split, n in (("train", n_train), ("val", classes)):
        for i in range(n):
            c = i % classes
            img = np.zeros((h, w, 3), np.float32)
            for ch in range(3):  # low-frequency content: a few random waves per channel
                for _ in range(4):
                    fx, fy, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
                    img[..., ch] += rng.uniform(20, 50) * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
            for _ in range(6):  # edges: flat rectangles
                x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
                img[y0 : y0 + rng.integers(8, h // 2), x0 : x0 + rng.integers(8, w // 2)] += rng.uniform(-60, 60, 3)
            img += 128 + rng.normal(0, 6, img.shape)  # sensor-like noise sets most of the JPEG's entropy
            path = root / split / f"c{c}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def _decode_pil(indices: Sequence[int]) -> int:
    from pipeline.data.decode import decode_image

    for i in indices:
        decode_image(_BYTES[i])
    return len(indices)


def _decode_cv2(indices: Sequence[int]) -> int:
    import cv2

    cv2.setNumThreads(1)
    for i in indices:
        cv2.imdecode(np.frombuffer(_BYTES[i], np.uint8), cv2.IMREAD_COLOR)
    return len(indices)


def _decode_epoch(pool, fn: Callable[[Sequence[int]], int], n: int, workers: int) -> Callable[[], int]:
    chunks = [list(range(k, n, workers * 4)) for k in range(workers * 4)]  # a few chunks per worker

    def run() -> int:
        return sum(pool.map(fn, chunks))

    return run


def _loader_epoch(loader) -> Callable[[], int]:
    def run() -> int:
        return sum(len(labels) for _, labels in loader)

    return run


def _bench_size(name: str, folder: Path, work: Path, image_size: int, batch: int, workers: int, reps: int,
                val_resize: int | None = None, raw_mode: bool = True) -> dict[str, dict[str, float]]:
    """Convert `folder` both ways, time every row; returns {row: {images_per_s, per_core, vs_raw, images}}."""
    from pipeline.data.formats import classification_data
    from pipeline.data.imagenet_ffcv import convert_imagenet_to_ffcv
    from pipeline.data.imagenet_wds import convert_imagenet_to_wds, scan_image_folder

    convert_imagenet_to_wds(folder, work / "wds", workers=workers, progress=False)
    convert_imagenet_to_ffcv(folder, work / "ffcv-jpg", write_mode="jpg", jpeg_quality=90, workers=workers,
                             progress=False)
    if raw_mode:
        convert_imagenet_to_ffcv(folder, work / "ffcv-raw", write_mode="raw", workers=workers, progress=False)

    _, items = scan_image_folder(folder)
    _BYTES[:] = [Path(it.path).read_bytes() for it in items["train"]]
    n = len(_BYTES)
    common = dict(batch_size=batch, num_workers=workers, image_size=image_size, val_resize=val_resize)
    loaders = {
        "wds": classification_data(str(work / "wds"), format="wds", **common).dataloader("train"),
        "ffcv jpg": classification_data(str(work / "ffcv-jpg"), format="ffcv", **common).dataloader("train"),
    }
    if raw_mode:
        loaders["ffcv raw"] = classification_data(str(work / "ffcv-raw"), format="ffcv", **common).dataloader("train")
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        fns = {"raw decode (PIL)": _decode_epoch(pool, _decode_pil, n, workers),
               "raw decode (cv2)": _decode_epoch(pool, _decode_cv2, n, workers)}
        fns.update({row: _loader_epoch(loader) for row, loader in loaders.items()})
        counts = {row: fn() for row, fn in fns.items()}  # also the warm-up (FFCV compiles, pools start)
        timings = interleaved(fns, reps=reps, warmup=0, clock="wall")
    base = "raw decode (PIL)"
    out = {}
    for row in fns:
        rate = counts[row] / timings.median(row)
        vs_raw = timings.ratio(base, row) * counts[row] / counts[base]
        out[row] = {"images_per_s": rate, "per_core": rate / workers, "vs_raw": vs_raw, "images": counts[row]}
    print(f"\n### {name}: {n} train images, crops to {image_size}, batch {batch}, {workers} workers, "
          f"{reps} repetitions\n")
    print("| pipeline | images/s | per core | / raw decode (PIL) |")
    print("|---|---|---|---|")
    for row, r in out.items():
        print(f"| {row} | {r['images_per_s']:.0f} | {r['per_core']:.0f} | {r['vs_raw']:.2f} |")
    return out


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Run the benchmark; returns {size name: {row: {images_per_s, per_core, vs_raw, images}}}."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024, help="synthetic photo JPEGs (default: 1024)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="loader workers and decode processes (default: the cores this process may use)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default: 5)")
    p.add_argument("--batch", type=int, default=64, help="batch size at 224 (default: 64; the digits use 4x)")
    p.add_argument("--keep", type=Path, default=None, help="keep the generated data in this directory")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64 small photos only, 1 repetition, no ffcv raw row")
    args = p.parse_args(argv)
    photo_size, crop = (500, 375), 224
    if args.quick:
        args.images, args.reps, args.batch, photo_size, crop = 64, 1, 16, (160, 120), 64

    import torch

    from importlib.metadata import version

    from pipeline.data.digits import write_digits
    from pipeline.data.ffcv_install import require_ffcv

    require_ffcv()  # fail early, with the install hint, when the extra is missing

    torch.set_num_threads(1)  # the main process only collates/copies; workers do the decoding
    import platform

    print(f"# loader benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"{args.workers} workers; torch {torch.__version__}, ffcv {version('ffcv')}; {_load()} (start)")
    work = Path(args.keep or tempfile.mkdtemp(prefix="condconv-bench-loader-"))
    results = {}
    try:
        t0 = time.perf_counter()
        if not (work / "photo").exists():
            make_photo_folder(work / "photo", args.images, photo_size)
        if not args.quick and not (work / "digits").exists():
            write_digits(work / "digits", image_format="jpg")
        print(f"data: {time.perf_counter() - t0:.1f} s")
        for sub in ("photo-out", "digits-out"):
            shutil.rmtree(work / sub, ignore_errors=True)
        results[f"photo {photo_size[0]}x{photo_size[1]} -> {crop}"] = _bench_size(
            f"photo-like JPEGs {photo_size[0]}x{photo_size[1]}", work / "photo", work / "photo-out", crop,
            args.batch, args.workers, args.reps, raw_mode=not args.quick)
        if not args.quick:
            results["digits 32 -> 32"] = _bench_size(
                "digits, 32x32 JPEGs", work / "digits", work / "digits-out", 32, args.batch * 4, args.workers,
                args.reps, val_resize=32)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{_load()} (end)")
    return results


if __name__ == "__main__":
    main()
